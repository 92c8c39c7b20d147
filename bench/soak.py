"""Kill -9 soak: train.py (the VAE stage and an SCT stage) and copilot.py --out, killed at random points.

    python bench/soak.py --kills 20                  # 20 kill points per process (bench/README.md has the result)
    python bench/soak.py --kills 3 --only copilot    # one process, a short run

Each process runs once uninterrupted (the reference, timed: T s). Then, in a fresh folder, it is started, its whole
process group killed with SIGKILL after a delay drawn uniformly from [0, T], the folder checked (no corrupt file:
every .pt loads with tokenizer.load_checkpoint, every .json parses, every .flac/.wav decodes to its end), and it is
started again (it resumes), until --kills kills are done; a run that finishes before its kill ends a chain, whose
result is compared, and the next kill starts a new chain. Every chain must end as the reference did: the same files
(no temporary or stray file), the final weights bit-identical (torch.equal on every tensor), dataset bytes
identical. The configs are tiny (the test fixtures' sizes), so one kill cycle takes seconds. Every kill writes
a checkpoint at every step (save_every 1), so many kills land in the middle of a write.

Prints one line per process: kills, chains, where the kills landed, and PASS or the first difference; exits 1 on
any failure. tests/test_end_to_end.py runs a short version.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tokenizer import load_checkpoint  # noqa: E402

TINY_VAE = ("--vae_model.latent_dim 4 --vae_model.encoder_dim 2 --vae_model.decoder_dim 16 "
            "--vae_model.strides 4,5,6,10 --vae_model.frame_rate 40 --vae_model.dilations 1 --vae_model.stft_ffts 256 "
            "--vae_model.mel_windows 256 --vae_model.mel_bins 20 "
            "--vae_model.gan false --vae_model.gain_shape true --vae.batch_size 2 --vae.crop_seconds 0.05 "
            "--vae.warmup_steps 1 --vae.heldout_fraction 0.5 --vae.eval_seconds 0.1 --vae.stats_crops 8 "
            "--vae_loop.log_every 1 --vae_loop.eval_every 10 --vae_loop.save_every 1").split()
TINY_SCT = ("--sct_model.hidden_size 32 --sct_model.intermediate_size 64 --sct_model.num_hidden_layers 2 "
            "--sct_model.num_generation_layers 1 --sct_model.num_attention_heads 2 --sct_model.num_key_value_heads 1 "
            "--sct_model.head_dim 16 --sct_model.query_pre_attn_scalar 16 --sct.seq_len 1024 --sct.batch_rows 2 "
            "--sct.eval_rows 2 --sct_loop.log_every 1 --sct_loop.eval_every 5 --sct_loop.save_every 1 "
            "--sct1.warmup_steps 1 --sct1.mixture story=1,edit=1,understand=1,t2a=1,caption=1,text=1").split()


def python(*args) -> list[str]:
    return [sys.executable, *map(str, args)]


def run(cmd: list[str], log: Path, kill_after: float | None = None) -> bool:
    """Run cmd in its own process group; SIGKILL the group after kill_after s -> True if it was killed."""
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return False


def snapshot(folder: Path) -> dict:
    """{path: (size, mtime)} of every file under folder."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def check_files(folder: Path) -> list[str]:
    """Every finished file under folder must read back whole; temporaries (*.tmp) are a killed write's, skipped."""
    problems = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".tmp"):
        try:
            if path.suffix == ".pt":
                load_checkpoint(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix in (".flac", ".wav"):
                with sf.SoundFile(str(path)) as f:
                    if len(f.read()) != f.frames:
                        raise ValueError("fewer samples than its header says")
        except Exception as e:                           # any failure to read is what this soak looks for
            problems.append(f"{path}: {type(e).__name__}: {e}")
    return problems


def compare(ref: Path, got: Path, weights: list[str]) -> str | None:
    """None when `got` ends as `ref` did: the same files, weights equal (files in `weights`), other bytes equal
    unless they hold timings (training logs and checkpoints). Else the first difference."""
    files = {p.relative_to(ref) for p in ref.rglob("*") if p.is_file()}
    got_files = {p.relative_to(got) for p in got.rglob("*") if p.is_file()}
    if files != got_files:
        return f"files differ: only in the reference {sorted(map(str, files - got_files))[:5]}, only after the " \
               f"kills {sorted(map(str, got_files - files))[:5]}"
    for name in weights:
        a, b = (load_checkpoint(root / name)["model"] for root in (ref, got))
        bad = [k for k in a if not torch.equal(a[k], b[k])]
        if bad or a.keys() != b.keys():
            return f"{name}: weights differ ({bad[:3]} ...)"
    timed = lambda p: p.suffix in (".pt", ".json") and (p.parts[0] in ("vae", "sct1") or p.name in weights)
    bad = [str(p) for p in sorted(files) if not timed(p) and (ref / p).read_bytes() != (got / p).read_bytes()]
    return f"bytes differ: {bad[:5]}" if bad else None


def soak(name: str, command, prepare, weights: list[str], kills: int, work: Path, rng: random.Random) -> dict:
    """The reference run, then kill-and-resume chains until `kills` kills -> a summary dict."""
    for old in work.glob(f"{name}-*"):                  # a soak starts from nothing
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    ref = work / f"{name}-ref"
    prepare(ref)
    t0 = time.perf_counter()
    run(command(ref), work / f"{name}-ref.log")
    seconds = time.perf_counter() - t0
    done, chains, corrupt, failures, landed = 0, 0, [], [], {}
    while done < kills:
        chains += 1
        folder = work / f"{name}-chain{chains}"
        prepare(folder)
        before = snapshot(folder)
        while done < kills and run(command(folder), work / f"{name}-chain{chains}.log", rng.uniform(0, seconds)):
            done, after = done + 1, snapshot(folder)
            where = "mid-write" if any(p.suffix == ".tmp" for p in after) else "mid-run" if after != before else \
                "start-up"                                    # nothing written or changed yet
            landed[where], before = landed.get(where, 0) + 1, after
            corrupt += check_files(folder)
        if done == kills:
            run(command(folder), work / f"{name}-chain{chains}.log")          # finish the last chain
        if diff := compare(ref, folder, weights):
            failures.append(f"chain {chains}: {diff}")
    return dict(process=name, kills=done, chains=chains, reference_s=round(seconds, 1), landed=landed,
                corrupt=corrupt, failures=failures, passed=not corrupt and not failures)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="kill -9 soak of train.py and copilot.py (module docstring)")
    p.add_argument("--kills", type=int, default=20, help="kill points per process")
    p.add_argument("--only", choices=("copilot", "vae", "sct"), action="append", help="soak only these (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    p.add_argument("--conversations", type=int, default=12, help="copilot: training conversations (+ 2 eval)")
    p.add_argument("--vae-steps", type=int, default=60, help="VAE stage: optimizer steps (a checkpoint each)")
    p.add_argument("--sct-steps", type=int, default=12, help="SCT stage 1: optimizer steps (a checkpoint each)")
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed at the end)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    rng, results = random.Random(args.seed), []
    data = work / "data"                              # the VAE and SCT stages train on a small copilot dataset
    copilot = lambda out: python("copilot.py", "--out", out, "--n", args.conversations, "--eval-n", 2)
    if not (data / "config.json").exists():
        run(copilot(data), work / "data.log")
    train = lambda *a: python("train.py", "--data", data, "--threads", 1, *a)
    vae = lambda out: train("--stage", "vae", "--out", out, *TINY_VAE, "--vae.steps", args.vae_steps)
    base = work / "base"                              # tokenizer, a tiny VAE and the latents, made once
    if not (base / "latents").is_dir():
        run(vae(base), work / "base.log")
        run(train("--stage", "tokenizer", "--out", base, "--data.vocab_size", 600), work / "base.log")
        run(train("--stage", "latents", "--out", base), work / "base.log")

    def copy_base(folder):
        folder.mkdir()
        for name in ("tokenizer.model", "vae.pt"):
            shutil.copyfile(base / name, folder / name)
        (folder / "latents").symlink_to(base / "latents")

    plans = {"copilot": (copilot, lambda folder: None, []),
             "vae": (vae, lambda folder: None, ["vae.pt"]),
             "sct": (lambda out: train("--stage", "sct1", "--out", out, *TINY_SCT, "--sct1.steps", args.sct_steps),
                     copy_base, ["sct1.pt"])}
    for name in args.only or plans:
        result = soak(name, *plans[name], args.kills, work, rng)
        results.append(result)
        print(f"{name}: {'PASS' if result['passed'] else 'FAIL'} {json.dumps(result)}", flush=True)
    if not args.work:
        shutil.rmtree(work)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
