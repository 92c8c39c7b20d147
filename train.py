"""Every training stage of AudioChat, from the data to the three SCT stages (paper section 4.3, appendix C).

    python train.py --preset toy                       # every toy stage in order, skipping finished ones
    python train.py --preset toy --stage sct2 --help   # one stage (resumed from its newest checkpoint); every flag
    torchrun --standalone --nproc_per_node=8 train.py --preset audiochat --stage sct1 --data.gemma_dir DIR

Stages, each writing one file in --out: data (toy: copilot.write_dataset), tokenizer.model, vae.pt, latents/ (the
conversation index, every item's audio encoded once), flam.pt (metrics.SmallFLAM), sct1.pt (Table 5 stage 1: t2a,
captioning, ASR, TTS, text), sct2.pt (+ stories, edits, understanding), sct.pt (stage 3: validated turns). Each
field of the config sections is a flag --SECTION.FIELD VALUE ("a,b", "story=1,edit=2", true, none). A row of
packed documents (draw_row) is a pure function of (seed, step, row), so any number of ranks sees one global batch,
a thread draws rows ahead, and a stage resumes exactly from OUT/<stage>/step-NNNNNN.pt (+ a readable .json).
Final files: {"kind", "config", "model", "step", "train_config"}; the SCT's add "stage", "history", "evals" and
"trained_with" (the tokenizer's and VAE's sizes and sha256, so sample.py can refuse a mismatched set).

Test: python -m pytest -q tests/test_train.py
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import time
import typing
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import soundfile as sf
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from copilot import (EVAL_SEEDS, MAX_START, TRAIN_SEEDS, DatasetConfig, OfflineCopilot, caption_of, read_conversation,
                     read_conversations, scene_to_json, write_dataset)
from diffusion import (DiffusionConfig, add_noise, sample_span_times, sample_uncond_span, span_loss_mask,
                       span_to_tokens, transfusion_loss)
from metrics import FLAM_PRESETS, SmallFLAM, detection_quality, flam_batch, flam_clips
from model import SCT, SCT_PRESETS
from tokenizer import (REQUESTS, SAMPLE_RATE, VAE_PRESETS, AudioError, Discriminator, Example, StereoVAE, TextTokenizer,
                       Turn, discriminator_loss, encode_conversation, load_audio, load_checkpoint, load_model,
                       load_state_dict_strict, mel_loss, stft_distance, task_turns, train_text_tokenizer, vae_loss,
                       write_atomic)


# -----------------------------------------------------------------------------
# Configuration: dataclass sections (each field's help is its flag's) and presets as named data

def setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class LoopConfig:
    log_every: int = setting(50, "print averaged losses every N steps")
    eval_every: int = setting(500, "evaluate on held-out data every N steps and at the end")
    save_every: int = setting(200, "write a resumable training checkpoint every N steps")
    keep_last: int = setting(3, "training checkpoints kept per stage")


@dataclass
class DataConfig:
    copilot_n: int = setting(600, "data stage: training conversations (copilot.py)")
    copilot_eval_n: int = setting(60, "data stage: evaluation conversations")
    copilot_seed: int = setting(0, "data stage: dataset seed (conversation i: seed, split, i)")
    copilot_workers: int = setting(1, "data stage: processes (the data does not depend on it)")
    vocab_size: int = setting(2048, "toy tokenizer: sentencepiece vocabulary size")
    gemma_dir: str = setting("", "Hugging Face Gemma 2 directory (config.json, tokenizer.model, safetensors)")
    speech_manifests: tuple[str, ...] = setting((), "JSONL {\"audio\", \"text\", [\"start\", \"end\"]}: ASR, TTS")
    sound_manifests: tuple[str, ...] = setting((), "JSONL as speech_manifests: captioning, text-to-audio")
    text_corpora: tuple[str, ...] = setting((), "JSONL {\"text\"} documents, text LM task")
    heldout_every: int = setting(100, "manifests, corpora: every N-th record is held out")
    max_clip_seconds: float = setting(30.0, "manifests: longer audio is cut to this, s")
    context_turns: int = setting(2, "edit task: most turns per document (Eq. 3)")
    skip_bad: bool = setting(False, "skip and count unreadable data (cut audio, JSON or JSONL lines), not stop")


@dataclass
class VAETrainConfig:
    steps: int = setting(400_000, "optimizer steps in all (DAC: 400 k)")
    batch_size: int = setting(32, "crops per step")
    crop_seconds: float = setting(0.5, "length of each random crop, s (DAC 0.38 s)")
    gain_db: float = setting(10.0, "random gain per crop, uniform in +-gain_db dB")
    lr: float = setting(1e-4, "AdamW peak learning rate, generator (DAC 1e-4)")
    disc_lr: float = setting(1e-4, "AdamW learning rate, discriminator")
    betas: tuple[float, float] = setting((0.8, 0.99), "AdamW betas (DAC, Oobleck)")
    weight_decay: float = setting(1e-3, "AdamW weight decay (Oobleck)")
    warmup_steps: int = setting(1000, "linear warm-up, then cosine decay to lr / 10")
    grad_clip: float = setting(1e3, "max gradient norm (DAC clips the generator at 1e3)")
    heldout_fraction: float = setting(0.05, "share of the files (every k-th) held out")
    eval_seconds: float = setting(4.0, "evaluate the first seconds of <= 16 held-out files")
    stats_crops: int = setting(256, "training crops that fit the latent normalisation")


@dataclass
class FLAMTrainConfig:
    steps: int = setting(20_000, "optimizer steps")
    batch_size: int = setting(16, "clips per step")
    captions: int = setting(8, "captions per clip: its sounds, then absent ones (>= the pool: every caption)")
    lr: float = setting(1e-3, "AdamW peak learning rate")
    warmup_steps: int = setting(200, "linear warm-up, then cosine decay to lr / 10")
    weight_decay: float = setting(0.01, "AdamW weight decay on matrices")
    grad_clip: float = setting(1.0, "max gradient norm")
    eval_clips: int = setting(180, "held-out clips (eval split turns) for frame AUROC / F1")


@dataclass
class SCTTrainConfig:
    seq_len: int = setting(8192, "tokens per packed row (Gemma 2's documents: 8192)")
    batch_rows: int = setting(64, "rows per optimizer step, all ranks together (global)")
    micro_rows: int = setting(1, "rows per forward pass per rank (gradient accumulation)")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas")
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices and embeddings")
    grad_clip: float = setting(1.0, "max global gradient norm")
    final_lr_fraction: float = setting(0.1, "cosine decay ends at lr * this (Table 5: none)")
    eval_rows: int = setting(64, "held-out rows per evaluation, spread over the ranks")
    dtype: str = setting("bfloat16", "autocast dtype on GPU (weights, gradients, AdamW stay float32); CPU: float32")
    from_gemma: bool = setting(False, "stage 1 starts from Gemma 2 2B in --data.gemma_dir")
    fsdp: bool = setting(False, "under torchrun: FSDP2 (fully_shard per block) instead of DDP")
    gradient_checkpointing: bool = setting(False, "recompute each block in the backward pass")
    lm_chunk: int = setting(1024, "LM logits are made and reduced this many positions at a time")
    prefetch: int = setting(2, "steps of rows a background thread draws ahead")
    gap_stories: int = setting(16, "held-out stories of the conditioning diagnostics at each eval (0: none)")
    understanding_grad: bool = setting(True, "the diffusion loss trains the U understanding layers too (paper 4.1)")
    peak_tflops: float = setting(989.0, "accelerator peak for the MFU (H100 SXM bf16: 989)")


TASKS = ("story", "edit", "upload_edit", "understand", "t2a", "caption", "asr", "tts", "text", "plan", "edit_plan")
WORLD_TASKS = ("plan", "edit_plan")   # text only, from copilot.OfflineCopilot on the fly (the toy world): plan_document


@dataclass
class StageConfig:
    steps: int = setting(None, "optimizer steps (Table 5)")
    lr: float = setting(None, "AdamW peak learning rate (Table 5)")
    warmup_steps: int = setting(None, "linear warm-up steps, then cosine decay (Table 5)")
    mixture: dict[str, float] = setting(None, "task -> weight; tasks: " + ", ".join(TASKS))
    validated_only: bool = setting(False, "leave out copilot turns with violations and the turns after them")


STAGE1 = dict(t2a=1.0, caption=1.0, asr=1.0, tts=1.0, text=1.0)
STORIES = dict(story=1.0, edit=2.0, upload_edit=1.0, understand=1.0)
TOY_MIX = dict(STAGE1, text=0.5, t2a=0.5, caption=0.5, **STORIES, plan=2.0, edit_plan=2.0)   # toy stage 2
TOY_PLANS = dict(plan=8.0, upload_edit=1.0, understand=1.0, edit=1.0)   # toy stage 3: plans, kept able to edit
SCT_FINAL = {"sct1": "sct1.pt", "sct2": "sct2.pt", "sct3": "sct.pt"}
PRESET_STAGES = {"toy": ("data", "tokenizer", "vae", "latents", "flam", "sct1", "sct2", "sct3"),
                 "audiochat": ("tokenizer", "latents", "sct1", "sct2", "sct3")}   # its VAE: --stage vae, one process
PRESETS = {
    # Toy: about 110 min on a 2-core CPU; no speech corpus; from scratch, so larger learning rates than Table 5's.
    "toy": dict(
        data=DataConfig(max_clip_seconds=8.0, context_turns=3),
        vae=VAETrainConfig(steps=2000, batch_size=4, crop_seconds=0.4, lr=3e-3, warmup_steps=100, stats_crops=64),
        vae_loop=LoopConfig(log_every=50, eval_every=500, save_every=200),
        flam=FLAMTrainConfig(steps=1500, batch_size=8, captions=16, lr=2e-3, warmup_steps=100, eval_clips=180),
        flam_loop=LoopConfig(log_every=100, eval_every=500, save_every=250),
        sct=SCTTrainConfig(seq_len=2048, batch_rows=4, micro_rows=1, betas=(0.9, 0.98), eval_rows=8),
        sct_loop=LoopConfig(log_every=10, eval_every=100, save_every=50), diffusion=DiffusionConfig(),
        sct1=StageConfig(steps=60, lr=1e-3, warmup_steps=20, mixture=dict(STAGE1, text=0.5, plan=1.0)),
        sct2=StageConfig(steps=600, lr=1e-3, warmup_steps=20, mixture=TOY_MIX),
        sct3=StageConfig(steps=250, lr=1e-3, warmup_steps=10, mixture=TOY_PLANS, validated_only=True)),
    # Paper scale on 8 x 80 GB (Table 5; 64 x 8192 tokens per step, not in the paper): FSDP2, bench/memory.py.
    "audiochat": dict(
        data=DataConfig(context_turns=5), vae=VAETrainConfig(), flam=FLAMTrainConfig(),
        vae_loop=LoopConfig(log_every=100, eval_every=5000, save_every=2000),
        flam_loop=LoopConfig(log_every=100, eval_every=2000, save_every=2000),
        sct=SCTTrainConfig(micro_rows=4, from_gemma=True, fsdp=True, gradient_checkpointing=True),
        sct_loop=LoopConfig(log_every=10, eval_every=2000, save_every=1000, keep_last=2), diffusion=DiffusionConfig(),
        sct1=StageConfig(steps=100_000, lr=2.5e-5, warmup_steps=500, mixture=STAGE1),
        sct2=StageConfig(steps=100_000, lr=2.5e-5, warmup_steps=0, mixture=dict(STAGE1, **STORIES)),
        sct3=StageConfig(steps=20_000, lr=1e-4, warmup_steps=2500, mixture=dict(STAGE1, **STORIES),
                         validated_only=True)),
}


def parse_value(text: str, hint):
    """A flag's text as its field's type: int, float, str, bool, X | None ("none"), tuple ("a,b"), dict ("k=v,k=v")."""
    args, items = typing.get_args(hint), [x.strip() for x in text.split(",") if x.strip()]
    if type(None) in args:
        return None if text.lower() == "none" else parse_value(text, args[0])
    if typing.get_origin(hint) is dict:                     # a malformed pair raises ValueError, which argparse reports
        return {k.strip(): parse_value(v.strip(), args[1]) for k, v in (x.split("=") for x in items)}
    if typing.get_origin(hint) is tuple:
        return tuple(parse_value(x, args[0]) for x in items)
    if hint is bool and text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes") if hint is bool else hint(text)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """The run flags and the chosen preset's config sections, each field overridden by its flag --SECTION.FIELD."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="toy")
    p = PRESETS[name := pre.parse_known_args(argv)[0].preset]
    sections = {"data": p["data"], "vae_model": VAE_PRESETS[name], "vae": p["vae"], "vae_loop": p["vae_loop"],
                "flam": p["flam"], "flam_loop": p["flam_loop"], "flam_model": FLAM_PRESETS[name],
                "sct_model": SCT_PRESETS[name], **{k: p[k] for k in ("sct", "sct_loop", "diffusion", *SCT_FINAL)}}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [--preset P] [--stage S] [run flags] [--SECTION.FIELD V ...]")
    run = parser.add_argument_group("run").add_argument
    run("--preset", choices=sorted(PRESETS), default="toy", help="model and schedule scale")
    run("--stage", choices=("all",) + PRESET_STAGES["toy"], default="all",
        help="the stage to run; `all` runs the preset's stages in order, skipping finished ones")
    run("--data", type=Path, default=Path("data") / name, help="copilot dataset folder (default data/<preset>)")
    run("--out", type=Path, default=Path("checkpoints") / name, help="checkpoint folder (default checkpoints/<preset>)")
    run("--seed", type=int, default=0, help="seed of weights, data order, CFG dropout and noise")
    run("--device", help="cpu, cuda, ... (default: cuda:LOCAL_RANK when available)")
    run("--threads", type=int, help="torch CPU threads per process (default: half its share of cores)")
    run("--stop-after", type=int, metavar="K", help="stop hard after step K (tests resuming)")
    for section, cfg in sections.items():
        group, hints = parser.add_argument_group(f"{section} ({type(cfg).__name__})"), typing.get_type_hints(type(cfg))
        for f in fields(cfg):
            convert = lambda text, hint=hints[f.name]: parse_value(text, hint)             # noqa: E731
            convert.__name__ = getattr(hints[f.name], "__name__", str(hints[f.name]))    # argparse's error names it
            group.add_argument(f"--{section}.{f.name}", type=convert, metavar="V", default=getattr(cfg, f.name),
                               help=f.metadata["help"].replace("%", "%%") + " [%(default)s]")
    args = parser.parse_args(argv)
    return args, {s: replace(cfg, **{f.name: getattr(args, f"{s}.{f.name}") for f in fields(cfg)})
                  for s, cfg in sections.items()}


# -----------------------------------------------------------------------------
# Checkpoints, the schedule, the loop of every stage, distributed wiring

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)   # whole tensors on the CPU, gathered from shards


def save_checkpoint(path: str | os.PathLike, obj: dict) -> None:
    """torch.save through tokenizer.write_atomic: a crash never leaves half a checkpoint."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Checkpoints:
    """A stage's resumable checkpoints, folder/step-NNNNNN.pt (+ a readable .json), the newest keep_last kept: full
    state dicts gathered from FSDP2 shards (a collective), torch RNG, log, `extra`; other settings are refused."""

    def __init__(self, folder: Path, keep_last: int, settings: dict, objects: dict | None = None, extra=None):
        self.folder, self.keep_last, self.settings, self.objects = Path(folder), keep_last, settings, objects or {}
        self.extra, self.log, self.path = extra or {}, {"history": [], "evals": []}, None   # path: resumed from

    def save(self, step: int, main: bool = True) -> None:
        state = {k: get_optimizer_state_dict(*o, options=FULL) if isinstance(o, tuple) else
                 get_model_state_dict(o, options=FULL) for k, o in self.objects.items()}
        if main:                                                    # every rank gathered; rank 0 writes, all wait
            path, info = self.folder / f"step-{step:06d}.pt", {"step": step, "settings": self.settings}
            text = json.dumps(info | {"last": self.log["history"][-1:], "evals": self.log["evals"]}, indent=1)
            write_atomic(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))    # first: see prune
            save_checkpoint(path, state | self.extra | self.log | info | {"rng": torch.get_rng_state()})
            self.prune()
        barrier()

    def prune(self) -> None:
        """Remove every step-* file but the newest keep_last checkpoints and their .json, so that what a kill -9 in a
        save or prune left (a .tmp, a .json without its .pt) is gone once the stage resumes."""
        keep = {p.stem for p in sorted(self.folder.glob("step-*.pt"))[-self.keep_last:]}
        for p in (p for p in self.folder.glob("step-*") if p.stem not in keep):
            p.unlink(missing_ok=True)                              # missing_ok: every rank prunes on resume

    def read(self) -> dict | None:
        """The newest checkpoint (after prune), memory-mapped so that ranks share the page cache, or None."""
        self.prune()
        if not (paths := sorted(self.folder.glob("step-*.pt"))):
            return None
        ckpt, self.path = load_checkpoint(paths[-1]), paths[-1]
        old = ckpt["settings"]
        if diff := {k: {f: (old[k].get(f), v.get(f)) for f in v | old[k] if old[k].get(f) != v.get(f)}
                    if isinstance(v, dict) and isinstance(old.get(k), dict) else (old.get(k), v)
                    for k, v in self.settings.items() if old.get(k) != v}:
            raise ValueError(f"{self.folder} was trained with other settings (then, now): {diff}; resume with the "
                             f"same flags or delete {self.folder}")
        return ckpt

    def resume(self, name: str, ckpt: dict | None = None, main: bool = True) -> int:
        if (ckpt := ckpt or self.read()) is None:
            return 0
        for k, o in self.objects.items():
            if isinstance(o, tuple):
                set_optimizer_state_dict(*o, ckpt[k], options=FULL)
            else:
                load_state_dict_strict(o, ckpt[k], self.path)
        torch.set_rng_state(ckpt["rng"])
        self.log = {k: ckpt.get(k, []) for k in self.log}
        if main:
            print(f"{name}: resuming from step {ckpt['step']} ({self.path})")
        return ckpt["step"]


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, **kw) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on norms, biases or scales)."""
    params = list(model.parameters())
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr, **kw)


def lr_at(step: int, peak: float, steps: int, warmup: int, final_fraction: float) -> float:
    """Every stage's learning rate: linear warm-up to `peak`, then cosine decay to peak * final_fraction at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimize(opt: torch.optim.Optimizer, lr: float, loss: torch.Tensor | None, params=(), clip: float = 0.0):
    """Backward of loss (None: done), the gradient norm clipped at clip (0: not), a step at lr -> the norm."""
    for group in opt.param_groups:
        group["lr"] = lr
    if loss is not None:
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def train_loop(name: str, ckpts: Checkpoints, start: int, steps: int, loop: LoopConfig, step_fn, evaluate,
               stop_after: int | None, extra=None, main: bool = True) -> None:
    """Every stage's loop: step_fn(step)'s means (+ ms per step, extra(means)) logged every log_every steps,
    evaluate() every eval_every and at the end; a checkpoint every save_every but the last (the stage writes that)."""
    sums, n, t0 = {}, 0, time.perf_counter()
    for step in tqdm(range(start, steps), initial=start, total=steps, desc=name, disable=not main, dynamic_ncols=True):
        sums, n, done, logged = {k: sums.get(k, 0.0) + v for k, v in step_fn(step).items()}, n + 1, step + 1, []
        if done % loop.log_every == 0 or done == steps:
            means = {k: v / n for k, v in sums.items()} | {"ms_per_step": 1000 * (time.perf_counter() - t0) / n}
            logged, sums, n = [("step", "history", means | (extra(means) if extra else {}))], {}, 0
        if done % loop.eval_every == 0 or done == steps:
            logged.append(("eval", "evals", evaluate()))
        for what, key, numbers in (x for x in logged if x[2]):
            ckpts.log[key].append({"step": done, **numbers})
            if main:
                tqdm.write(f"{name} {what} {done:6d} | " + " ".join(f"{k} {v:.4g}" for k, v in numbers.items()))
        t0 = time.perf_counter() if logged else t0                 # ms/step counts training only
        if done % loop.save_every == 0 and done < steps:
            ckpts.save(done, main)
        if stop_after is not None and done >= stop_after:
            raise SystemExit(f"{name}: stopped after step {done} (--stop-after)")


def prefetched(fn, keys, depth: int):
    """fn(k) for each k of keys in order, a background thread up to `depth` keys ahead (fn: a pure function of k)."""
    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
        futures = deque()
        for k in keys:
            futures.append(pool.submit(fn, k))
            if len(futures) > depth:
                yield futures.popleft().result()
        yield from (f.result() for f in futures)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    main: bool = True                                     # rank 0: it prints and writes


def setup_distributed(device: str | None) -> Dist:
    dev = torch.device(device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if "RANK" not in os.environ:
        return Dist(device=dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev, dist.get_rank() == 0)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap_model(core: torch.nn.Module, d: Dist, fsdp: bool) -> torch.nn.Module:
    """DDP, or FSDP2: fully_shard every block, then the root (float32 shards: autocast computes in bf16 from them)."""
    if d.world == 1 or not fsdp:
        return core if d.world == 1 else DDP(core, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(d.device.type, (d.world,))
    for block in core.sct.model.layers:
        fully_shard(block, mesh=mesh)
    return fully_shard(core, mesh=mesh)


def grad_sync(model: torch.nn.Module, on: bool):
    """No DDP all-reduce or FSDP2 reduce-scatter on non-final micro-steps (bench/memory.py counts the cost)."""
    if hasattr(model, "set_requires_gradient_sync"):                # FSDP2
        model.set_requires_gradient_sync(on)
    return model.no_sync() if isinstance(model, DDP) and not on else contextlib.nullcontext()


# -----------------------------------------------------------------------------
# Stages: tokenizer, the VAE on random crops of every audio file under a folder, the small FLAM (metrics.py)

def finished(path: Path) -> bool:
    if path.exists():
        print(f"{path.stem}: {path} exists; skipping")
    return path.exists()


def gemma_dir(cfg: DataConfig) -> Path:
    """The Hugging Face Gemma 2 directory, checked: a clear error when it is missing or incomplete."""
    d = Path(cfg.gemma_dir) if cfg.gemma_dir else None
    if missing := ["--data.gemma_dir"] if d is None else [n for n in ("config.json", "tokenizer.model")
                                                          if not (d / n).is_file()]:
        raise FileNotFoundError(f"Gemma 2 directory {d}: missing {missing}; download the pre-trained (not "
                                f"instruction-tuned) model once, e.g. `huggingface-cli download google/gemma-2-2b "
                                f"--local-dir DIR`, and pass --data.gemma_dir DIR")
    return d


def run_tokenizer(cfg: DataConfig, data: Path, out: Path, preset: str) -> None:
    """toy: train a sentencepiece model on the training split's text; audiochat: copy Gemma's tokenizer.model."""
    if finished(path := out / "tokenizer.model"):
        return
    if preset != "toy":
        return write_atomic(path, lambda tmp: Path(tmp).write_bytes((gemma_dir(cfg) / "tokenizer.model").read_bytes()))
    texts = [w for ws in REQUESTS.values() for w in ws] + ["user\n", "model\n"]
    for conv in read_conversations(data, "train", cfg.skip_bad):
        texts += [conv.seed_text] + [x for t in conv.turns for x in (t.instruction, scene_to_json(t.scene),
                                                                      scene_to_json(caption_of(t.scene)))]
    numbers = tuple(f"{i / 10:g}" for i in range(-10, 81)) + tuple(map(str, range(-60, -9)))   # plans' numbers
    tok = train_text_tokenizer(texts, path, cfg.vocab_size, numbers)                           # kept whole
    print(f"tokenizer: {tok.vocab_size} pieces from {len(texts)} texts")


def skipped(error: Exception, skip_bad: bool, what: str, key: str = "") -> int:
    """Unreadable data (`key`): an error naming --data.skip_bad, or with skip_bad a printed note -> 1 (a count)."""
    if not skip_bad and "--data.skip_bad" in str(error):
        raise error
    if not skip_bad:
        raise type(error)(f"{error}; or pass --data.skip_bad true to skip and count bad {what}") from error
    tqdm.write(f"--data.skip_bad: skipped {key}{': ' * bool(key)}{error}")
    return 1


def find_audio(root: str | os.PathLike, skip_bad: bool = False) -> list[tuple[Path, int, int]]:
    """(path, frames, sample rate) of every .wav/.flac under root, sorted; skip_bad: each decoded once, bad ones out."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder; make audio with `python copilot.py --out {root}`")
    files, bad = [], 0
    for path in sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in (".wav", ".flac")):
        try:
            info = sf.info(str(path))
            if info.channels > 2 or info.frames == 0:
                raise AudioError(f"{path}: {info.channels} channels, {info.frames} frames; training needs non-empty "
                                 f"mono or stereo files, remove or convert it")
            if skip_bad:
                load_audio(path)                           # decoded once: a truncated or corrupt file shows here
            files.append((path, info.frames, info.samplerate))
        except (AudioError, sf.LibsndfileError) as e:
            bad += skipped(AudioError(str(e)) if isinstance(e, sf.LibsndfileError) else e, skip_bad, "files")
    if bad:
        print(f"--data.skip_bad: skipped {bad} of {bad + len(files)} audio files under {root}")
    if not files:
        raise FileNotFoundError(f"--data {root}: no .wav or .flac files under it")
    return files


def split_heldout(items: list, fraction: float) -> tuple[list, list]:
    """(training, held out): every k-th item held out (k = 1 / fraction, at least 2; none of one item), in O(n)."""
    k = max(2, round(1 / fraction)) if len(items) >= 2 else len(items) + 1
    return [x for i, x in enumerate(items) if i % k != k - 1], items[k - 1::k]


def crop_batch(files: list, batch_size: int, num_samples: int, generator: torch.Generator,
               gain_db: float = 0.0) -> torch.Tensor:
    """[batch_size, 2, num_samples] crops of random files (zero-padded, mono duplicated), each at a random gain in
    +-gain_db dB (levels, hence the stereo image, at every level) and mirrored left/right half of the time."""
    crops = []
    for path, frames, sr in (files[i] for i in torch.randint(len(files), (batch_size,), generator=generator)):
        if sr != SAMPLE_RATE:                                # rare: resample the whole file, then crop
            audio = load_audio(path)
        else:
            start = int(torch.randint(max(1, frames - num_samples + 1), (1,), generator=generator))
            try:
                data = sf.read(str(path), frames=num_samples, start=start, dtype="float32", always_2d=True)[0]
            except sf.LibsndfileError as e:
                raise AudioError(f"{path}: cannot decode it ({e}): truncated or corrupt; remove it, or pass "
                                 f"--data.skip_bad true to find and skip bad files first") from e
            audio = torch.from_numpy(data.T.copy()).expand(2, -1)
        if audio.shape[1] > num_samples:
            start = int(torch.randint(audio.shape[1] - num_samples + 1, (1,), generator=generator))
            audio = audio[:, start: start + num_samples]
        crops.append(F.pad(audio, (0, num_samples - audio.shape[1])))
    batch, gain = torch.stack(crops), 10 ** ((torch.rand(batch_size, 1, 1, generator=generator) * 2 - 1) * gain_db / 20)
    swap = torch.rand(batch_size, generator=generator) < 0.5
    batch[swap] = batch[swap].flip(1)
    return batch * gain


def train_vae(cfg, tc: VAETrainConfig, loop: LoopConfig, data: Path, out: Path, seed: int,
              stop_after: int | None = None, device: str | torch.device = "cpu", skip_bad: bool = False) -> Path:
    """The VAE stage (cfg: tokenizer.VAEConfig) on `device` -> vae.pt; held out: STFT, mel distance of <= 16 files."""
    if finished(final := Path(out) / "vae.pt"):
        return final
    train, heldout = split_heldout(find_audio(data, skip_bad), tc.heldout_fraction)
    clips = [load_audio(f[0])[None, :, : int(tc.eval_seconds * SAMPLE_RATE)].to(device) for f in heldout[:16]]
    print(f"vae: {len(train)} training files, {len(heldout)} held out, under {data}; on {device}")
    torch.manual_seed(seed)
    vae, disc = StereoVAE(cfg).to(device), Discriminator(cfg).to(device) if cfg.gan else None
    opt = torch.optim.AdamW(vae.parameters(), tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    opt_d = disc and torch.optim.AdamW(disc.parameters(), tc.disc_lr, betas=tc.betas, weight_decay=tc.weight_decay)
    ckpts = Checkpoints(Path(out) / "vae", loop.keep_last, {"vae_model": asdict(cfg), "vae": asdict(tc), "seed": seed},
                        {"model": vae, "optimizer": (vae, opt)} | ({"disc": disc, "disc_optimizer": (disc, opt_d)}
                                                                  if disc else {}))
    crop = int(tc.crop_seconds * SAMPLE_RATE)

    def step(s: int) -> dict:
        audio = crop_batch(train, tc.batch_size, crop, keyed(seed, "vae", s), tc.gain_db).to(device)
        loss, parts, recon = vae_loss(vae, audio, disc)
        optimize(opt, lr := lr_at(s, tc.lr, tc.steps, tc.warmup_steps, 0.1), loss, vae.parameters(), tc.grad_clip)
        if disc:                                                   # LSGAN discriminator step on the same pair
            disc.zero_grad(set_to_none=True)                       # (the adversarial loss reached it too)
            parts["disc"] = (d_loss := discriminator_loss(disc, audio, recon)).item()
            optimize(opt_d, tc.disc_lr, d_loss)
        return {"loss": loss.item(), **parts, "lr": lr}

    @torch.no_grad()
    def evaluate() -> dict:
        pairs = [(vae.eval().decode(vae.encode(x), x.shape[-1]), x) for x in clips]
        vae.train()
        losses = [(stft_distance(r, x, cfg.stft_ffts).item(), mel_loss(r, x, cfg.mel_windows, cfg.mel_bins).item())
                  for r, x in pairs]
        return {k: sum(v) / len(pairs) for k, v in zip(("stft", "mel"), zip(*losses))}    # none held out: {}

    train_loop("vae", ckpts, ckpts.resume("vae"), tc.steps, loop, step, evaluate, stop_after)
    vae.eval().fit_latent_stats(crop_batch(train, 8, crop, keyed(seed, "stats", i), 0.0).to(device)
                                for i in range(math.ceil(tc.stats_crops / 8)))
    print(f"vae: latent normalisation fitted, |shift| mean {vae.latent_shift.abs().mean():.3f}, "
          f"scale mean {vae.latent_scale.mean():.3f}")
    save_checkpoint(final, {"kind": "vae", "config": asdict(cfg), "model": get_model_state_dict(vae, options=FULL),
                            "train_config": asdict(tc), "step": tc.steps})
    return final


def train_flam(mc, tc: FLAMTrainConfig, loop: LoopConfig, data: Path, out: Path, seed: int,
               stop_after: int | None = None, device: str | torch.device = "cpu", skip_bad: bool = False) -> Path:
    """Train metrics.SmallFLAM (mc: FLAMConfig) on `device` -> flam.pt, with frame AUROC/F1 on the eval split."""
    if finished(final := out / "flam.pt"):
        return final
    clips, held = (flam_clips(read_conversations(data, split, skip_bad)) for split in ("train", "eval"))
    held, pool = held[: tc.eval_clips], sorted({c for clip in clips for c in clip.events})
    print(f"flam: {len(clips)} training clips, {len(pool)} captions, {len(held)} held-out clips; on {device}")
    torch.manual_seed(seed)
    model, quality, settings = SmallFLAM(mc).to(device), {}, dict(flam_model=asdict(mc), flam=asdict(tc), seed=seed)
    opt = adamw(model, tc.lr, tc.weight_decay)
    ckpts = Checkpoints(out / "flam", loop.keep_last, settings, {"model": model, "optimizer": (model, opt)})

    def step(s: int) -> dict:
        rng = random.Random(f"{seed}|flam|{s}")                    # stateless: resume needs only the step
        audio, captions, targets = flam_batch(rng.sample(clips, min(tc.batch_size, len(clips))), pool, tc.captions,
                                              rng, mc.hop_samples)
        loss = model.loss(audio.to(device), captions, targets.to(device))
        optimize(opt, lr := lr_at(s, tc.lr, tc.steps, tc.warmup_steps, 0.1), loss, model.parameters(), tc.grad_clip)
        return {"loss": loss.item(), "lr": lr}

    def evaluate() -> dict:                                        # held-out frame detection
        if held:
            quality.update(detection_quality(model.eval().score, held))
            model.train()
        return quality

    train_loop("flam", ckpts, ckpts.resume("flam"), tc.steps, loop, step, evaluate, stop_after)
    save_checkpoint(final, {"kind": "flam", "config": asdict(mc), "model": get_model_state_dict(model, options=FULL),
                            "detection": quality, "step": tc.steps, "train_config": settings})
    return final


# -----------------------------------------------------------------------------
# Paper-scale readers (documented JSONL formats), the conversation index and the latent cache

def read_jsonl(path: Path, keys: tuple[str, ...], split: str, heldout_every: int,
               skip_bad: bool = False) -> list[tuple[int, dict]]:
    """(index, record) of one split of a JSONL file (every heldout_every-th is "eval"): objects with strings at keys."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such data file; check the --data.* flag that names it")
    rows, bad = [], 0
    for n, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and all(isinstance(row.get(k), str) and row[k].strip() for k in keys)
            problem = "" if ok else f"needs non-empty string values for {list(keys)}, got {line[:120]!r}"
        except json.JSONDecodeError as e:
            problem = f"not JSON ({e.msg}); each line must be one object with keys {list(keys)}"
        if problem:
            bad += skipped(ValueError(f"{path}, line {n}: {problem}"), skip_bad, "lines")
        else:
            rows.append(row)
    if bad:
        print(f"--data.skip_bad: skipped {bad} bad lines of {path}")
    return [(i, row) for i, row in enumerate(rows) if (i % heldout_every == heldout_every - 1) == (split == "eval")]


def read_manifest(path: Path, split: str, heldout_every: int, skip_bad: bool = False) -> list[dict]:
    """Audio-text manifest: one {"audio": file (relative to the manifest), "text": transcript or caption, ["start": s,
    "end": s]} per line -> records with the file made absolute and "key", their latent cache file's name."""
    tag = f"{Path(path).stem}-{hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]}"
    return [row | {"key": f"{tag}/{i // 1000:05d}/{i:08d}", "audio": Path(path).parent / row["audio"]}
            for i, row in read_jsonl(path, ("audio", "text"), split, heldout_every, skip_bad)]


@torch.no_grad()
def run_latents(cfg: DataConfig, data: Path, out: Path, d: Dist) -> None:
    """index-<split>.json (rank 0, once; delete it to redo it): per conversation its file, turns, valid turns (before
    the first violation), single (a one-sound t2a one). Then every story's or manifest clip's audio (cut at
    max_clip_seconds) encoded once by the frozen VAE (normalised posterior mean, float16), sharded over ranks."""
    folder, vae_path = out / "latents", out / "vae.pt"
    vae, stamp, digest = load_model(StereoVAE, vae_path, d.device), folder / "vae.sha256", file_sha256(vae_path)
    if stamp.exists() and stamp.read_text() != digest:
        raise ValueError(f"{folder} was encoded with another vae.pt; delete {folder} to encode again")
    for split in ("train", "eval") if d.main else ():                # write_atomic makes the folder
        if not (path := folder / f"index-{split}.json").exists():
            c = read_conversations(data, split, cfg.skip_bad) if (data / split).is_dir() else []
            index = dict(file=[f"{x.turns[0].audio.parent.name}/{x.id}.json" for x in c],
                         turns=[len(x.turns) for x in c], single=[x.turns[0].kind == "t2a" for x in c],
                         valid=[next((k for k, t in enumerate(x.turns) if t.violations), len(x.turns)) for x in c])
            write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(index)))
        stamp.write_text(digest)
    barrier()
    items = [(f"stories/{s}/{Path(f).stem}", data / s / f) for s in ("train", "eval")
             for f in json.loads((folder / f"index-{s}.json").read_text())["file"]]
    items += [(r["key"], r) for s in ("train", "eval") for m in cfg.speech_manifests + cfg.sound_manifests
              for r in read_manifest(m, s, cfg.heldout_every, cfg.skip_bad)]
    todo = [it for i, it in enumerate(items) if i % d.world == d.rank and not (folder / f"{it[0]}.pt").exists()]
    print(f"latents: {len(items)} items, {len(todo)} to encode on rank {d.rank}")
    bad = 0
    for key, item in tqdm(todo, desc="latents", disable=not d.main, dynamic_ncols=True):
        try:
            spans = [(t.audio, 0.0, None) for t in read_conversation(item).turns] if isinstance(item, Path) else \
                [(item["audio"], s := float(item.get("start", 0)), min(float(item.get("end") or math.inf),
                                                                      s + cfg.max_clip_seconds))]
            audio = [load_audio(p)[None, :, int(a * SAMPLE_RATE): None if b is None else int(b * SAMPLE_RATE)]
                     for p, a, b in spans]
        except (ValueError, FileNotFoundError) as e:      # AudioError, a cut conversation file, its audio missing
            bad += skipped(e, cfg.skip_bad, "items", key)
            continue
        save_checkpoint(folder / f"{key}.pt", {"latents": [vae.encode(x.to(d.device))[0].to("cpu", torch.float16)
                                                           for x in audio]})
    if bad:
        print(f"--data.skip_bad: {bad} of {len(todo)} items not encoded (rank {d.rank})")
    barrier()


# -----------------------------------------------------------------------------
# SCT data: documents per task, Diffusion Forcing noise, CFG dropout, packing

def turn_pairs(select: torch.Tensor, lo: int, hi) -> torch.Tensor:
    """[M, 2] (conversation, turn k) for lo <= k < hi of the selected conversations, vectorised (6 M in seconds)."""
    counts = ((hi - lo) * select).clamp(min=0)
    conv = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return torch.stack([conv, torch.arange(len(conv)) - (counts.cumsum(0) - counts)[conv] + lo], 1)


class TaskData:
    """Every document source of one split per task: pools[task] = ([M, 2] (conversation in the index, turn k)
    pairs, manifest or corpus records), one list to draw from (item); with skip_bad, only what has latents."""

    def __init__(self, cfg: DataConfig, stories: Path, latents: Path, split: str, tok: TextTokenizer,
                 audio_dim: int, validated_only: bool = False):
        self.cfg, self.stories, self.latents_dir, self.split, self.tok, self.audio_dim = \
            cfg, stories, latents, split, tok, audio_dim
        if not (path := latents / f"index-{split}.json").is_file():
            raise FileNotFoundError(f"{path}: no conversation index; run `python train.py --stage latents` first")
        index = self.index = json.loads(path.read_text())
        cached = lambda key: not cfg.skip_bad or (latents / f"{key}.pt").is_file()          # noqa: E731
        keep = torch.tensor([cached(f"stories/{split}/{Path(f).stem}") for f in index["file"]], dtype=torch.long)
        turns, single = torch.tensor(index["turns"], dtype=torch.long) * keep, torch.tensor(index["single"]).bool()
        valid = torch.tensor(index["valid"], dtype=torch.long) * keep if validated_only else turns
        first, story = valid.clamp(max=1), ~single                  # first: turn 0, if it is valid
        speech, sounds = ([r for m in manifests for r in read_manifest(m, split, cfg.heldout_every, cfg.skip_bad)
                           if cached(r["key"])] for manifests in (cfg.speech_manifests, cfg.sound_manifests))
        corpus = [row for c in cfg.text_corpora
                  for _, row in read_jsonl(c, ("text",), split, cfg.heldout_every, cfg.skip_bad)]
        none = torch.zeros(0, 2, dtype=torch.long)
        self.pools = dict(text=(turn_pairs(turns > 0, 0, 1), corpus), t2a=(turn_pairs(single, 0, first), sounds),
                          caption=(turn_pairs(single, 0, first), sounds), story=(turn_pairs(story, 0, first), []),
                          understand=(turn_pairs(story, 0, valid), []), edit=(turn_pairs(story, 1, valid), []),
                          upload_edit=(turn_pairs(story, 1, valid), []), asr=(none, speech), tts=(none, speech))

    def size(self, task: str) -> int:
        return 1 << 30 if task in WORLD_TASKS else sum(map(len, self.pools[task]))

    def item(self, task: str, j: int) -> tuple:
        """The j-th item of a task's pool: ("conv", conversation, turn k), ("record", record, 0) or ("world", j, 0)."""
        if task in WORLD_TASKS:
            return ("world", j, 0)
        convs, records = self.pools[task]
        return ("conv", *convs[j].tolist()) if j < len(convs) else ("record", records[j - len(convs)], 0)

    def conversation(self, i: int):
        return read_conversation(self.stories / self.split / self.index["file"][i])

    def mixture(self, weights: dict[str, float], strict: bool) -> tuple[list[str], list[float]]:
        if unknown := sorted(set(weights) - set(TASKS)):
            raise ValueError(f"unknown tasks {unknown} in a stage mixture; known: {', '.join(TASKS)}")
        tasks = [t for t, w in weights.items() if w > 0 and self.size(t)]
        if strict and not tasks:
            raise ValueError(f"no {self.split} data for any task of the mixture {weights}; check --data and --data.*")
        return tasks, [weights[t] for t in tasks]

    def latents(self, key: str) -> list[torch.Tensor]:
        return [z.float() for z in load_checkpoint(self.latents_dir / f"{key}.pt")["latents"]]

    def document(self, task: str, rng: random.Random) -> list[Turn] | list[int] | Example:
        """A random document of `task`: chat turns, token ids for the text LM task, an Example for WORLD_TASKS."""
        return self.build(task, self.item(task, rng.randrange(self.size(task))), rng)

    def build(self, task: str, item: tuple, rng: random.Random) -> list[Turn] | list[int]:
        """The document of `task` for one pool item, laid out by tokenizer.task_turns. An edit is a window of at most
        context_turns turns ending at turn k, each a story after the turns before it (Eq. 3); a window that starts
        after turn 0 opens as an upload edit of the audio before it (Eq. 2), so the edited scene is in context."""
        kind, ref, k = item
        if kind == "world":                 # a fresh conversation of 1 (plan) or 2..context_turns turns (edit_plan)
            n = 1 if task == "plan" else rng.randint(2, max(2, self.cfg.context_turns))
            seeds = EVAL_SEEDS if self.split == "eval" else TRAIN_SEEDS
            turns = OfflineCopilot().conversation(rng.choice(seeds), rng, n)
            return plan_document([(text, scene_to_json(scene)) for text, _, scene in turns], self.tok, self.audio_dim)
        if kind == "record":
            if task == "text":
                return self.tok.encode(ref["text"])
            z, request = self.latents(ref["key"])[0], task != "t2a" and rng.choice(REQUESTS[task])
            if task in ("asr", "caption"):
                return task_turns(task, clip=z, request=request, answer=ref["text"])
            return task_turns(task, instruction=ref["text"] if task == "t2a" else request.format(ref["text"]), audio=z)
        conv = self.conversation(ref)
        if task == "text":
            return self.tok.encode("\n".join([conv.seed_text] + [t.instruction for t in conv.turns]))
        z, turns = self.latents(f"stories/{self.split}/{conv.id}"), conv.turns
        plan, caption = [scene_to_json(t.scene) for t in turns], [scene_to_json(caption_of(t.scene)) for t in turns]
        if task == "t2a":
            return task_turns("t2a", instruction=turns[0].instruction, audio=z[0])
        if task == "story":
            return task_turns("story", instruction=turns[0].instruction, plan=plan[0], audio=z[0])
        if task == "caption":
            return task_turns("caption", clip=z[0], request=rng.choice(REQUESTS["caption"]),
                              answer=turns[0].scene.sounds[0].text)
        if task == "understand":
            return task_turns("understand", clip=z[k], request=rng.choice(REQUESTS["understand"]), caption=caption[k])
        first = k if task == "upload_edit" else max(0, k - self.cfg.context_turns + 1)
        doc = [] if first == 0 else task_turns("upload_edit", clip=z[first - 1], instruction=turns[first].instruction,
                                               caption=caption[first - 1], plan=plan[first], audio=z[first])
        for j in range(first + (first > 0), k + 1):
            doc += task_turns("story", instruction=turns[j].instruction, plan=plan[j], audio=z[j])
        return doc


def plan_document(turns: list[tuple[str, str]], tok: TextTokenizer, audio_dim: int = 0) -> Example:
    """(instruction, plan JSON) turns as a text-only document, each model turn ending in the <unused0> that opens
    its audio (where sample.py samples it): the toy learns to plan from these, microseconds a document."""
    ex = encode_conversation([Turn(role, [text]) for pair in turns for role, text in zip(("user", "model"), pair)],
                             tok, audio_dim=audio_dim)
    ends = ex.labels == tok.end_of_turn_id                              # the model turns' <end_of_turn> targets
    ids, labels = ex.ids.clone(), ex.labels.masked_fill(ends, tok.audio_start_id)
    ids[1:][ends[:-1]] = tok.audio_start_id
    n = int(ends.nonzero()[-1]) + 2                                     # through the last <unused0>
    labels[n - 1] = -100
    return replace(ex, ids=ids[:n], labels=labels[:n], audio_mask=ex.audio_mask[:n], span_ids=ex.span_ids[:n])


def story_losses(sct: SCT, ex: Example, t: float, noise: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(LM loss, v-loss) of one document with every audio frame at diffusion time t, noised with `noise`."""
    t_tok = torch.where(ex.audio_mask, t, 0.0)
    x, v = (torch.zeros(len(ex.ids), sct.config.audio_dim) for _ in range(2))
    if len(ex.latents):
        x[ex.audio_mask], v[ex.audio_mask] = add_noise(ex.latents, t_tok[ex.audio_mask], noise)
    h_text, h_audio = sct(*(a[None].to(device) for a in (ex.ids, x, ex.audio_mask, t_tok, ex.span_ids,
                                                          torch.zeros_like(ex.ids))))
    lm, au = (ex.labels != -100).to(device), ex.audio_mask.to(device)
    return (F.cross_entropy(sct.lm_logits(h_text[0][lm]).float(), ex.labels.to(device)[lm]).item(),
            (sct.velocity(h_audio[0][au]).float() - v.to(device)[au]).pow(2).mean().item())


@torch.no_grad()
def conditioning_gaps(sct: SCT, data: TaskData, n: int, seed: int, device: torch.device,
                      times: tuple[float, ...] = (0.3, 0.6, 0.9)) -> dict[str, float]:
    """What the model takes from its condition, on n held-out stories (turn 0), each against the next one's: lm_gap
    = LM loss of a plan given another story's instruction - given its own (the same plan tokens); diff_gap@t = v-loss
    of the audio given another story's instruction and plan - given its own, at diffusion time t, the same noise;
    place_gap@t = the same given its plan mirrored (each sound on the other side, at the other end). A model that
    ignores its condition has gaps 0; one that takes what sounds from the plan, not where and when, a place gap of 0."""
    if len(convs := data.pools["story"][0][:n, 0].tolist()) < 2:
        return {}
    stories = [(c.turns[0].instruction, c.turns[0].scene, data.latents(f"stories/{data.split}/{c.id}")[0])
               for c in map(data.conversation, convs)]
    out = defaultdict(float)
    for i, (text, scene, z) in enumerate(stories):
        other_text, other_scene, _ = stories[(i + 1) % len(stories)]
        for w, doc in (("true", (text, plan := scene_to_json(scene))), ("swap", (other_text, plan))):
            lm, _ = story_losses(sct, plan_document([doc], data.tok), 0.0, torch.zeros(0), device)
            out[f"lm_{w}"] += lm / len(stories)
        noise = torch.randn(z.shape, generator=keyed(seed, "gap", i))
        mirrored = [replace(s, panning=-s.panning, start_time=min(MAX_START, scene.duration - s.end))
                    for s in scene.sounds]
        docs = {w: encode_conversation(task_turns("story", instruction=a, plan=b, audio=z), data.tok)
                for w, (a, b) in (("true", (text, plan)), ("swap", (other_text, scene_to_json(other_scene))),
                                  ("place", (text, scene_to_json(replace(scene, sounds=mirrored)))))}
        for t in times:
            for w, ex in docs.items():
                out[f"diff_{w}@{t}"] += story_losses(sct, ex, t, noise, device)[1] / len(stories)
    return {"lm_plan": out["lm_true"], "lm_gap": out["lm_swap"] - out["lm_true"]} | {
        f"{k}_gap@{t}": out[f"diff_{w}@{t}"] - out[f"diff_true@{t}"] for t in times
        for k, w in (("diff", "swap"), ("place", "place"))}


def keyed(*parts) -> torch.Generator:
    """A generator seeded by any values, 63 bits of their hash: stateless randomness keyed by seed, step, row, ..."""
    return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(),
                                                                        digest_size=8).digest(), "little") >> 1)


def noise_document(ex: Example, gen: torch.Generator, dc: DiffusionConfig, cfg_dropout: float,
                   tok: TextTokenizer) -> dict[str, torch.Tensor]:
    """CFG dropout, one diffusion time per model span (Diffusion Forcing; a span that is only read stays clean, t =
    0) and the noised latents of one document: 1-D tensors of its length T (x, v: [T, audio_dim], 0 at text)."""
    if k := sample_uncond_span(ex.span_is_model, gen, cfg_dropout):     # the unconditional document of span k
        ex = encode_conversation([Turn("model", [ex.latents[ex.span_ids[ex.audio_mask] == k]])], tok)
    t = sample_span_times(ex.span_is_model, gen, dc.clean_context_prob)       # [N]
    t_tok = span_to_tokens(t, ex.span_ids)                                    # [T], 0 at text
    x_t, v = add_noise(ex.latents, t_tok[ex.audio_mask], torch.randn(ex.latents.shape, generator=gen))
    x, v_full = (torch.zeros(len(ex.ids), ex.latents.shape[1]) for _ in range(2))
    x[ex.audio_mask], v_full[ex.audio_mask] = x_t, v
    return dict(ids=ex.ids, labels=ex.labels, audio_mask=ex.audio_mask, span_ids=ex.span_ids, t=t_tok, audio=x,
                v=v_full, loss_mask=span_to_tokens(span_loss_mask(t, ex.span_is_model), ex.span_ids))


def draw_row(data: TaskData, mixture: tuple[list[str], list[float]], seq_len: int, dc: DiffusionConfig,
             cfg_dropout: float, *key) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """One packed row of seq_len tokens, a pure function of `key` (seed, step, row): documents drawn until one no
    longer fits (three times), each its own doc id (positions restart, no attention across documents), CFG dropout,
    times and noise keyed by (*key, document). A document longer than a row is dropped and counted, a text windowed."""
    rng, docs, used, misses, stats = random.Random("|".join(map(str, key))), [], 0, 0, {"dropped": 0, "docs": 0}
    while misses < 3:
        task = rng.choices(*mixture)[0]
        doc = data.document(task, rng)
        if task == "text":                    # <bos> window [<eos>]: no <eos> where a window cuts the text short
            start = rng.randrange(max(1, len(doc) - seq_len + 3))
            t = torch.tensor([data.tok.bos_id] + doc[start: start + seq_len - 2] + [data.tok.eos_id] * (
                start + seq_len - 2 >= len(doc)))
            z = torch.zeros(len(t), dtype=torch.long)
            ex = Example(ids=t, labels=torch.cat([t[1:], torch.tensor([-100])]), audio_mask=z.bool(), span_ids=z,
                         span_is_model=torch.zeros(0, dtype=torch.bool), latents=torch.zeros(0, data.audio_dim))
        else:
            ex = doc if isinstance(doc, Example) else encode_conversation(doc, data.tok, audio_dim=data.audio_dim)
        stats["dropped"] += len(ex.ids) > seq_len
        if used + len(ex.ids) > seq_len:
            misses += 1
            continue
        docs.append(noise_document(ex, keyed(*key, len(docs)), dc, cfg_dropout, data.tok))
        used += len(docs[-1]["ids"])                               # CFG dropout may have shortened it
    pad, D = seq_len - used, data.audio_dim
    tail = dict(ids=torch.full((pad,), data.tok.pad_id), labels=torch.full((pad,), -100),
                audio_mask=torch.zeros(pad, dtype=torch.bool), span_ids=torch.zeros(pad, dtype=torch.long),
                t=torch.zeros(pad), audio=torch.zeros(pad, D), v=torch.zeros(pad, D),
                loss_mask=torch.zeros(pad, dtype=torch.bool))
    row = {name: torch.cat([doc[name] for doc in docs] + [tail[name]]) for name in tail}
    row["doc_ids"] = torch.cat([torch.full((len(doc["ids"]),), i) for i, doc in enumerate(docs + [tail])])
    return row, stats | {"docs": len(docs), "tokens": used}


class TransfusionForcing(torch.nn.Module):
    """The SCT and the Transfusion Forcing loss (Eq. 12) in one forward, so that DDP/FSDP wrap a single module."""

    def __init__(self, sct: SCT, loss_weight: float, lm_chunk: int):
        super().__init__()
        self.sct, self.loss_weight, self.lm_chunk = sct, loss_weight, lm_chunk

    def forward(self, b: dict[str, torch.Tensor], n_text, n_audio):
        h_text, h_audio = self.sct(b["ids"], b["audio"], b["audio_mask"], b["t"], b["span_ids"], b["doc_ids"])
        lm, au = b["labels"] != -100, b["loss_mask"]                # gather positions before the vocab matmul
        return transfusion_loss(h_text[lm], b["labels"][lm], self.sct.velocity(h_audio[au]), b["v"][au], None,
                                self.loss_weight, n_text, n_audio, head=self.sct.lm_logits, chunk=self.lm_chunk)


# -----------------------------------------------------------------------------
# Stages: SCT 1-3 (paper section 4.3, Table 5)

def build_sct(stage: str, cfg: dict, out: Path, trained_with: dict) -> SCT:
    """The stage's starting SCT: the previous stage's weights, else Gemma 2 (paper scale) or a fresh init."""
    mc = replace(cfg["sct_model"], vocab_size=trained_with["tokenizer_vocab_size"],
                 audio_dim=trained_with["vae_audio_dim"])
    if previous := {"sct2": "sct1", "sct3": "sct2"}.get(stage):
        if (ckpt := load_checkpoint(path := out / SCT_FINAL[previous], "sct")).get("trained_with") != trained_with:
            raise ValueError(f"{path} was trained with another tokenizer or VAE ({ckpt.get('trained_with')}, now "
                             f"{trained_with}); retrain {previous} or restore its tokenizer.model and vae.pt")
        return load_model(SCT, path, ckpt=ckpt).train()
    if not cfg["sct"].from_gemma:
        return SCT(mc)
    sct = SCT.from_gemma(gemma_dir(cfg["data"]), mc.num_generation_layers, mc.audio_dim,    # paper B.2
                         attn_implementation=mc.attn_implementation)
    if sct.config.vocab_size != mc.vocab_size:
        raise ValueError(f"Gemma 2 in {cfg['data'].gemma_dir} has a vocabulary of {sct.config.vocab_size}, but "
                         f"tokenizer.model has {mc.vocab_size} pieces; run --stage tokenizer with this gemma_dir")
    return sct


def run_rows(model: torch.nn.Module, rows: list, d: Dist, tc: SCTTrainConfig, train: bool) -> dict:
    """Forward (and backward) of this rank's rows, micro_rows at a time, each token weighted as in one process: the
    losses divide by the global token counts / world size, as DDP/FSDP average gradients over the ranks."""
    counts = torch.tensor([[(r["labels"] != -100).sum(), r["loss_mask"].sum(), s["tokens"], s["dropped"]]
                           for r, s in rows] or [[0] * 4], dtype=torch.float64).sum(0)
    n_text, n_audio, tokens, dropped = all_sum(counts.to(d.device)).tolist()
    parts, chunks = torch.zeros(2, dtype=torch.float64), [rows[i: i + tc.micro_rows]
                                                          for i in range(0, len(rows), tc.micro_rows)]
    for i, chunk in enumerate(chunks):
        batch = {k: torch.stack([r[k] for r, _ in chunk]).to(d.device, non_blocking=True) for k in chunk[0][0]}
        with grad_sync(model, not train or i == len(chunks) - 1), torch.autocast(
                d.device.type, getattr(torch, tc.dtype), enabled=d.device.type == "cuda" and tc.dtype != "float32"):
            total, lm, diff = model(batch, n_text / d.world, n_audio / d.world)
            if train:
                total.backward()
        parts += torch.tensor([lm.item(), diff.item()], dtype=torch.float64)
    lm, diff = (all_sum(parts.to(d.device)).cpu() / d.world).tolist()
    return dict(lm=lm, diff=diff, tokens=tokens, dropped=dropped)


def train_sct(stage: str, cfg: dict, data: Path, out: Path, seed: int, d: Dist, stop_after: int | None = None) -> Path:
    """One SCT stage: DDP/FSDP2, gradient accumulation, AdamW + lr_at, periodic eval, keep-last-N checkpoints."""
    st, tc, loop, dc = cfg[stage], cfg["sct"], cfg["sct_loop"], cfg["diffusion"]
    if finished(final := out / SCT_FINAL[stage]):
        return final
    if tc.batch_rows % (tc.micro_rows * d.world) or tc.eval_rows % d.world:   # else FSDP collectives hang
        raise ValueError(f"--sct.batch_rows {tc.batch_rows} must be a multiple of --sct.micro_rows {tc.micro_rows} "
                         f"x {d.world} ranks, and --sct.eval_rows {tc.eval_rows} of the ranks")
    per_rank, tok = tc.batch_rows // d.world, TextTokenizer(out / "tokenizer.model")
    trained_with = {"tokenizer_vocab_size": tok.vocab_size, "tokenizer_sha256": file_sha256(out / "tokenizer.model"),
                    "vae_audio_dim": 2 * load_checkpoint(out / "vae.pt", "vae")["config"]["latent_dim"],
                    "vae_sha256": file_sha256(out / "vae.pt")}
    settings = {k: asdict(cfg[k]) for k in ("sct_model", "sct", "diffusion", "data")} | {
        "stage": asdict(st), "seed": seed, "trained_with": trained_with}
    ckpts = Checkpoints(out / stage, loop.keep_last, settings)
    torch.manual_seed(seed)
    sct = load_model(SCT, ckpts.path, ckpt=ckpt) if (ckpt := ckpts.read()) else build_sct(stage, cfg, out, trained_with)
    sct.gradient_checkpointing, sct.understanding_grad = tc.gradient_checkpointing, tc.understanding_grad
    core = TransfusionForcing(sct.to(d.device), dc.loss_weight, tc.lm_chunk)
    model, opt = wrap_model(core, d, tc.fsdp), adamw(core, st.lr, tc.weight_decay, betas=tc.betas,
                                                     fused=d.device.type == "cuda")
    ckpts.objects, ckpts.extra = {"model": sct, "optimizer": (core, opt)}, {"config": asdict(sct.config)}
    step = ckpts.resume(stage, ckpt, d.main) if ckpt else 0      # (the model's weights were loaded before wrapping)
    train_data, eval_data = (TaskData(cfg["data"], data, out / "latents", split, tok, sct.config.audio_dim,
                                      st.validated_only) for split in ("train", "eval"))
    mixture, eval_mixture = train_data.mixture(st.mixture, strict=True), eval_data.mixture(st.mixture, strict=False)
    n_params = sum(p.numel() for p in sct.parameters())
    if d.main:
        print(f"{stage}: SCT {n_params / 1e6:.1f} M parameters, {d.world} rank(s) on {d.device}, {tc.batch_rows} x "
              f"{tc.seq_len} tokens per step, accumulation {per_rank // tc.micro_rows}; training tasks "
              f"{dict(zip(*mixture))}, held-out tasks {eval_mixture[0]} (tasks without data are left out)")
    flops_per_token = 6 * n_params + 12 * len(sct.model.layers) * sct.config.num_attention_heads * \
        sct.config.head_dim * tc.seq_len
    batches = prefetched(lambda s: [draw_row(train_data, mixture, tc.seq_len, dc, dc.cfg_dropout, seed, s, j)
                                    for j in range(d.rank * per_rank, (d.rank + 1) * per_rank)],  # this rank's rows
                         range(step, st.steps), tc.prefetch)

    def train_step(s: int) -> dict:
        r = run_rows(model, next(batches), d, tc, train=True)
        lr = lr_at(s, st.lr, st.steps, st.warmup_steps, tc.final_lr_fraction)
        gnorm = optimize(opt, lr, None, core.parameters(), tc.grad_clip)
        return r | {"gnorm": (gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm).item(), "lr": lr}

    def extra(m: dict) -> dict:                                   # nanoGPT's log line: loss, time, tokens/s, MFU
        tok_s = 1000 * m["tokens"] / m["ms_per_step"]
        return {"loss": m["lm"] + dc.loss_weight * m["diff"], "tok_s": tok_s} | (
            {"mfu": flops_per_token * tok_s / (tc.peak_tflops * 1e12 * d.world)} if d.device.type == "cuda" else {})

    @torch.no_grad()
    def evaluate() -> dict:
        rows = [draw_row(eval_data, eval_mixture, tc.seq_len, dc, 0.0, seed, "eval", j)
                for j in range(d.rank, tc.eval_rows, d.world)]
        sct.eval()
        r = run_rows(model, rows, d, tc, train=False)
        gaps = conditioning_gaps(sct, eval_data, tc.gap_stories, seed, d.device)   # every rank: FSDP gathers
        sct.train()
        return {"loss": r["lm"] + dc.loss_weight * r["diff"], "lm": r["lm"], "diff": r["diff"]} | gaps

    train_loop(stage, ckpts, step, st.steps, loop, train_step, evaluate, stop_after, extra, d.main)
    model_sd = get_model_state_dict(sct, options=FULL)
    if d.main:
        save_checkpoint(final, {"kind": "sct", "config": asdict(sct.config), "model": model_sd, "stage": stage,
                                "step": st.steps, "train_config": {k: asdict(v) for k, v in cfg.items()},
                                "trained_with": trained_with, **ckpts.log})
    barrier()
    return final


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_args(argv)
    d, dc, ranks_here = setup_distributed(args.device), cfg["data"], int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // (2 * ranks_here)))  # idle OpenMP threads
    if d.main:                                                    # the effective configuration, one line per section
        print(f"run: preset {args.preset}, stage {args.stage}, data {args.data}, out {args.out}, seed {args.seed}, "
              f"{d.world} rank(s)\n" + "\n".join(f"{name}: {json.dumps(asdict(s))}" for name, s in cfg.items()))
    try:
        for stage in PRESET_STAGES[args.preset] if args.stage == "all" else (args.stage,):
            start = time.time()
            if stage in ("data", "vae", "flam") and d.world > 1 and not (args.out / f"{stage}.pt").exists():
                raise RuntimeError(f"stage {stage} runs in one process: run `python train.py --stage {stage} --out "
                                   f"{args.out}` first, then torchrun the later stages")
            if stage == "data":                                    # copilot.write_dataset skips finished files
                print("data:", json.dumps(write_dataset(args.data, dc.copilot_n, dc.copilot_eval_n,
                                                        DatasetConfig(seed=dc.copilot_seed), dc.copilot_workers)))
            elif stage == "tokenizer" and d.main:
                run_tokenizer(dc, args.data, args.out, args.preset)
            elif stage in ("vae", "flam") and d.main:
                (train_vae if stage == "vae" else train_flam)(cfg[f"{stage}_model"], cfg[stage], cfg[f"{stage}_loop"],
                    args.data, args.out, args.seed, args.stop_after, d.device, dc.skip_bad)
            elif stage == "latents":
                run_latents(dc, args.data, args.out, d)
            elif stage in SCT_FINAL:
                train_sct(stage, cfg, args.data, args.out, args.seed, d, args.stop_after)
            barrier()
            if d.main:
                print(f"{stage}: done in {(time.time() - start) / 60:.1f} min wall time")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
