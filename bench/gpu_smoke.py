"""Smoke test of the paper-scale paths on one GPU, in about 5 minutes: what the CPU test suite cannot run.

    python bench/gpu_smoke.py                     # a GPU: 1 + 1 layers of the audiochat shapes (vocab 256 k)
    python bench/gpu_smoke.py --device cpu        # tiny shapes, the same code (tests/test_train.py runs it)

1. attention: the flex path (block masks, soft-cap score_mod, compiled on CUDA) against the exact eager path on
   packed rows with audio spans, forward and (on a GPU) backward: max abs error of outputs and gradients.
2. training: bf16 autocast steps of train.run_rows (chunked LM loss, activation checkpointing, fused AdamW):
   losses, tokens/s and the peak memory next to bench/memory.py's estimate for the same shapes.
3. FSDP2 over NCCL with 2 ranks (when there are 2 GPUs): the same global batch gives one process's losses.
4. kill and resume: train.py's sct1 stage on a tiny generated dataset, killed (SIGKILL) after its first
   checkpoint, resumed, against an uninterrupted run: max abs weight difference.
5. the VAE stage: train.train_vae for 2 steps on the device (the audiochat VAE with its GAN on a GPU).
Each line reports a number; a broken path raises. Nothing here is claimed to have run on a GPU until someone
runs it (README: what has never run on a GPU).
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import train  # noqa: E402
from copilot import DatasetConfig, write_dataset  # noqa: E402
from memory import memory_estimate  # noqa: E402
from model import SCT, SCT_PRESETS  # noqa: E402
from tokenizer import SAMPLE_RATE, VAE_PRESETS, StereoVAE, load_checkpoint  # noqa: E402

TINY_VAE = replace(VAE_PRESETS["toy"], latent_dim=4, encoder_dim=2, decoder_dim=16, dilations=(1,), stft_ffts=(256,),
                   mel_windows=(256,), mel_bins=(20,))


def shapes(device: torch.device):
    """The SCT config, tokens per row and rows: audiochat's layer shapes on a GPU, tiny ones on the CPU."""
    if device.type == "cuda":
        return replace(SCT_PRESETS["audiochat"], num_hidden_layers=1, num_generation_layers=1), 8192, 2
    return replace(SCT_PRESETS["toy"], vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                   num_generation_layers=1, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                   attn_implementation="flex"), 256, 2


def random_rows(mc, T: int, n: int, seed: int) -> list:
    """n packed rows like draw_row's: two documents each, an audio span of 40 frames per document, noised."""
    g, rows = torch.Generator().manual_seed(seed), []
    for _ in range(n):
        span, doc = torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long)
        doc[T // 2:] = 1
        for k, start in ((1, T // 8), (1, T // 2 + T // 8)):
            span[start: start + min(40, T // 8)] = k
        ids = torch.randint(3, mc.vocab_size, (T,), generator=g).masked_fill(span > 0, 0)
        labels = torch.cat([ids[1:], torch.tensor([-100])]).masked_fill(span > 0, -100)
        t = torch.where(span > 0, torch.rand(T, generator=g), 0.0)
        audio = torch.randn(T, mc.audio_dim, generator=g) * (span > 0)[:, None]
        rows.append(({"ids": ids, "labels": labels, "audio_mask": span > 0, "span_ids": span, "t": t, "audio": audio,
                      "v": torch.randn(T, mc.audio_dim, generator=g), "loss_mask": span > 0, "doc_ids": doc},
                     {"tokens": T, "dropped": 0}))
    return rows


def check_attention(mc, T: int, dev: torch.device) -> str:
    torch.manual_seed(0)
    flex = SCT(mc).to(dev)
    eager = SCT(replace(mc, attn_implementation="eager")).to(dev)
    eager.load_state_dict(flex.state_dict())
    b = {k: v[None].to(dev) for k, v in random_rows(mc, T, 1, 1)[0][0].items()}
    grad = dev.type == "cuda"                                     # flex has no CPU backward (torch 2.13)
    outs = []
    for m in (flex, eager):
        with torch.set_grad_enabled(grad):
            h_text, h_audio = m(b["ids"], b["audio"], b["audio_mask"], b["t"], b["span_ids"], b["doc_ids"])
            if grad:
                (h_text.square().mean() + h_audio.square().mean()).backward()
        outs.append([h_text.detach(), h_audio.detach()] + [p.grad for p in m.parameters() if grad])
    out_err = max((a - e).abs().max().item() for a, e in zip(outs[0][:2], outs[1][:2]))
    grad_err = max([(a - e).abs().max().item() for a, e in zip(outs[0][2:], outs[1][2:]) if a is not None] or [0])
    return f"attention: flex vs eager, {T} tokens, max abs error forward {out_err:.2e}" + (
        f", gradients {grad_err:.2e}" if grad else ", backward skipped (flex has no CPU backward)")


def train_steps(mc, T: int, rows_per_step: int, dev: torch.device, steps: int = 4) -> str:
    torch.manual_seed(0)
    tc = replace(train.PRESETS["audiochat"]["sct"], seq_len=T, batch_rows=rows_per_step, micro_rows=1,
                 lm_chunk=min(1024, T), dtype="bfloat16" if dev.type == "cuda" else "float32")
    sct = SCT(replace(mc, attn_implementation="flex" if dev.type == "cuda" else "eager")).to(dev)
    sct.gradient_checkpointing = True
    core = train.TransfusionForcing(sct, 5.0, tc.lm_chunk)
    opt = train.adamw(core, 1e-4, 0.1, fused=dev.type == "cuda")
    d, losses, t0 = train.Dist(device=dev), [], 0.0
    for step in range(steps):
        if step == 1:                                             # the first step compiles flex: not timed
            torch.cuda.synchronize() if dev.type == "cuda" else None
            t0 = time.perf_counter()
        r = train.run_rows(core, random_rows(mc, T, rows_per_step, 10 + step), d, tc, train=True)
        torch.nn.utils.clip_grad_norm_(core.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(f"{r['lm']:.3f}/{r['diff']:.3f}")
    torch.cuda.synchronize() if dev.type == "cuda" else None
    tok_s = T * rows_per_step * (steps - 1) / (time.perf_counter() - t0)
    peak = f"{torch.cuda.max_memory_allocated(dev) / 1e9:.1f} GB" if dev.type == "cuda" else "n/a on the CPU"
    estimate = memory_estimate(sct.config, replace(tc, batch_rows=1), world=1)["total"]
    return (f"training: {steps} steps of {rows_per_step} x {T} tokens, {tc.dtype} autocast, lm/diff {' '.join(losses)}"
            f", {tok_s:.0f} tokens/s, peak memory {peak} (bench/memory.py for these shapes, 1 GPU: {estimate:.1f} GB)")


def fsdp_worker(rank: int, world: int, mc, T: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    d = train.setup_distributed(None)
    torch.manual_seed(0)
    tc = replace(train.PRESETS["audiochat"]["sct"], seq_len=T, batch_rows=2 * world, micro_rows=1, lm_chunk=1024)
    sct = SCT(mc).to(d.device)
    sct.gradient_checkpointing = True
    core = train.TransfusionForcing(sct, 5.0, tc.lm_chunk)
    model = train.wrap_model(core, d, fsdp=True)
    rows = random_rows(mc, T, 2 * world, 20)[2 * rank: 2 * rank + 2]
    r = train.run_rows(model, rows, d, tc, train=True)
    gnorm = torch.nn.utils.clip_grad_norm_(core.parameters(), 1.0).full_tensor().item()
    if d.main:
        print(f"fsdp2: {world} ranks over nccl, lm {r['lm']:.4f} diff {r['diff']:.4f} gnorm {gnorm:.4f}", flush=True)
    torch.distributed.destroy_process_group()


def tiny_world(root: Path) -> tuple[Path, Path]:
    """A 4 + 1 conversation copilot dataset, a toy tokenizer, a random tiny VAE and the latents stage."""
    data, out = root / "data", root / "ck"
    write_dataset(data, 4, 1, DatasetConfig(t2a_frac=0.25))
    train.main(["--stage", "tokenizer", "--data", str(data), "--out", str(out), "--data.vocab_size", "600"])
    torch.manual_seed(0)
    train.save_checkpoint(out / "vae.pt", {"kind": "vae", "config": asdict(TINY_VAE), "step": 0,
                                           "model": StereoVAE(TINY_VAE).state_dict()})
    train.main(["--stage", "latents", "--data", str(data), "--out", str(out)])
    return data, out


def kill_and_resume(dev: torch.device, root: Path) -> str:
    data, out = tiny_world(root)
    flags = ["--stage", "sct1", "--data", str(data), "--device", str(dev), "--sct_model.hidden_size", "32",
             "--sct_model.intermediate_size", "64", "--sct_model.num_hidden_layers", "1",
             "--sct_model.num_generation_layers", "1", "--sct_model.num_attention_heads", "2",
             "--sct_model.num_key_value_heads", "1", "--sct_model.head_dim", "16", "--sct.seq_len", "512",
             "--sct.batch_rows", "2", "--sct.eval_rows", "2", "--sct_loop.save_every", "2", "--sct1.steps", "8",
             "--sct1.mixture", "story=1,edit=1,understand=1,t2a=1,caption=1,text=1", "--threads", "1"]
    runs = {}
    for name in ("straight", "killed"):
        ck = root / name
        ck.mkdir()
        for f in ("tokenizer.model", "vae.pt"):
            (ck / f).write_bytes((out / f).read_bytes())
        (ck / "latents").symlink_to(out / "latents")
        cmd = [sys.executable, str(ROOT / "train.py"), *flags, "--out", str(ck)]
        if name == "killed":
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while proc.poll() is None and not list((ck / "sct1").glob("step-*.pt")):
                time.sleep(0.05)
            if proc.poll() is not None:
                return "kill and resume: the run ended before its first checkpoint could be awaited; not tested"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = sorted(p.name for p in (ck / "sct1").glob("step-*.pt"))
        subprocess.run(cmd, check=True, capture_output=True)
        runs[name] = load_checkpoint(ck / "sct1.pt")["model"]
    diff = max((runs["straight"][k] - runs["killed"][k]).abs().max().item() for k in runs["straight"])
    return f"kill and resume: SIGKILL with {killed_at} on disk, resumed to step 8; max abs weight difference {diff:.2e}"


def vae_step(dev: torch.device, root: Path) -> str:
    (root / "audio").mkdir()
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    for i in range(3):
        sf.write(root / "audio" / f"{i}.wav", np.stack([np.sin(2 * np.pi * 300 * (i + 1) * t)] * 2, 1) * 0.3,
                 SAMPLE_RATE)
    cfg = VAE_PRESETS["audiochat"] if dev.type == "cuda" else TINY_VAE
    tc = train.VAETrainConfig(steps=2, batch_size=2, warmup_steps=1, heldout_fraction=0.5, eval_seconds=0.5,
                              stats_crops=8)
    start = time.perf_counter()
    path = train.train_vae(cfg, tc, train.LoopConfig(log_every=1, eval_every=2, save_every=10), root / "audio",
                           root / "vae", 0, device=dev)
    return f"vae: 2 steps of the {'audiochat' if dev.type == 'cuda' else 'tiny'} VAE (GAN {cfg.gan}) on {dev} in " \
           f"{time.perf_counter() - start:.1f} s -> {path.name}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: attention,train,fsdp,resume,vae")
    a = p.parse_args()
    dev, skip = torch.device(a.device), set(a.skip.split(","))
    torch.set_num_threads(1 if dev.type == "cpu" else torch.get_num_threads())
    mc, T, rows = shapes(dev)
    print(f"gpu_smoke on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'the CPU'}, torch "
          f"{torch.__version__}; SCT {asdict(mc)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root, start = Path(tmp), time.perf_counter()
        for name, part in (("attention", lambda: check_attention(mc, min(T, 4096), dev)),
                           ("train", lambda: train_steps(mc, T, rows, dev)),
                           ("resume", lambda: kill_and_resume(dev, root)), ("vae", lambda: vae_step(dev, root))):
            if name not in skip:
                print(part(), f"[{time.perf_counter() - start:.0f} s]", flush=True)
        if "fsdp" not in skip and dev.type == "cuda" and torch.cuda.device_count() >= 2:
            torch.multiprocessing.spawn(fsdp_worker, (2, mc, T, 29511), nprocs=2)
        elif "fsdp" not in skip:
            print("fsdp2: needs 2 GPUs; skipped (tests/test_train.py runs FSDP2 over gloo on the CPU)")


if __name__ == "__main__":
    main()
