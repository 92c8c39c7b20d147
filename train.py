"""Training for AudioChat. This first version holds the VAE stage (paper section 4.1, appendix B.1).

    python train.py --stage vae --preset toy --data DIR --out checkpoints/toy

trains the stereo VAE of tokenizer.py on random crops of every .wav/.flac file under DIR, logs one line
every --log-every steps, evaluates reconstruction on held-out files, fits the latent normalisation at
the end and writes DIR_OUT/vae.pt atomically. Run it again to resume exactly where it stopped. The
SCT and FLAM stages join this file later; `save_checkpoint` is shared by all of them.
"""
import argparse
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import soundfile as sf
import torch
from tqdm import tqdm

from tokenizer import (SAMPLE_RATE, VAE_PRESETS, AudioError, Discriminator, StereoVAE, discriminator_loss,
                       load_audio, load_checkpoint, load_state_dict_strict, mel_loss, stft_distance, vae_loss)


# -----------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path: str | os.PathLike, obj: dict) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# Audio data: random crops of every audio file under a folder

AUDIO_SUFFIXES = (".wav", ".flac")


def find_audio(root: str | os.PathLike) -> list[tuple[Path, int, int]]:
    """(path, frames, sample rate) of every .wav/.flac under root, sorted; a clear error if there is none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder; make audio with `python copilot.py --out {root}`")
    files = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES):
        info = sf.info(str(path))
        if info.channels > 2 or info.frames == 0:
            raise AudioError(f"{path}: {info.channels} channels, {info.frames} frames; training needs non-empty "
                             f"mono or stereo files, remove or convert it")
        files.append((path, info.frames, info.samplerate))
    if not files:
        raise FileNotFoundError(f"--data {root}: no .wav or .flac files under it")
    return files


def read_crop(file: tuple[Path, int, int], num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """A random crop [2, num_samples] at 48 kHz (zero-padded when the file is shorter); mono duplicated."""
    path, frames, sr = file
    if sr != SAMPLE_RATE:                                    # rare: resample the whole file, then crop
        audio = load_audio(path)
    else:
        start = int(torch.randint(max(1, frames - num_samples + 1), (1,), generator=generator))
        data, _ = sf.read(str(path), frames=num_samples, start=start, dtype="float32", always_2d=True)
        audio = torch.from_numpy(data.T.copy()).expand(2, -1)
    if audio.shape[1] > num_samples:
        start = int(torch.randint(audio.shape[1] - num_samples + 1, (1,), generator=generator))
        audio = audio[:, start: start + num_samples]
    return torch.nn.functional.pad(audio, (0, num_samples - audio.shape[1]))


def crop_batch(files: list, batch_size: int, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """[batch_size, 2, num_samples] random crops from random files; left and right swapped at random
    so the model sees every stereo image mirrored as often as not."""
    idx = torch.randint(len(files), (batch_size,), generator=generator).tolist()
    batch = torch.stack([read_crop(files[i], num_samples, generator) for i in idx])
    swap = torch.rand(batch_size, generator=generator) < 0.5
    batch[swap] = batch[swap].flip(1)
    return batch


# -----------------------------------------------------------------------------
# Stage: VAE

@dataclass
class VAETrainConfig:
    steps: int = 400_000            # optimizer steps in all (DAC: 400k)
    batch_size: int = 32            # crops per step
    crop_seconds: float = 0.5       # length of each random crop, s (DAC 0.38 s)
    lr: float = 1e-4                # AdamW peak learning rate, generator (DAC 1e-4)
    disc_lr: float = 1e-4           # AdamW learning rate, discriminator
    betas: tuple[float, float] = (0.8, 0.99)   # AdamW betas (DAC, Oobleck)
    weight_decay: float = 1e-3      # AdamW weight decay (Oobleck)
    warmup_steps: int = 1000        # linear warm-up, then cosine decay to lr / 10 at `steps`
    grad_clip: float = 1e3          # max gradient norm (DAC clips the generator at 1e3)
    heldout_fraction: float = 0.05  # share of the files (sorted by path, every k-th) kept for evaluation
    eval_seconds: float = 4.0       # evaluate on the first seconds of each held-out file (at most 16 files)
    stats_crops: int = 256          # training crops whose latents fit the normalisation statistics


VAE_TRAIN_PRESETS = {
    # ~40 min on 2 free CPU cores at ~1 s/step (the VAE's 48 kHz convs dominate).
    "toy": VAETrainConfig(steps=3000, batch_size=4, crop_seconds=0.4, lr=3e-3, warmup_steps=100,
                          stats_crops=64),
    "audiochat": VAETrainConfig(),
}


def lr_at(step: int, tc: VAETrainConfig, peak: float) -> float:
    """Linear warm-up over warmup_steps, then cosine from peak to peak / 10 at tc.steps."""
    if step < tc.warmup_steps:
        return peak * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate_vae(vae: StereoVAE, clips: list[torch.Tensor]) -> dict[str, float]:
    """Inference-path reconstruction (encode -> decode, posterior mean) of held-out clips [2, S]: mean
    multi-resolution STFT distance on L/R and multi-scale mel distance."""
    c, stft, mel = vae.config, 0.0, 0.0
    for audio in clips:
        recon = vae.decode(vae.encode(audio[None]), audio.shape[-1])
        stft += stft_distance(recon, audio[None], c.stft_ffts).item()
        mel += mel_loss(recon, audio[None], c.mel_windows, c.mel_bins).item()
    return {"stft": stft / len(clips), "mel": mel / len(clips)}


def train_vae(args: argparse.Namespace) -> Path:
    """The VAE stage; returns the path of vae.pt."""
    cfg = VAE_PRESETS[args.preset]
    cfg = replace(cfg, gan=False) if args.no_gan else cfg
    tc = VAE_TRAIN_PRESETS[args.preset]
    tc = replace(tc, **{k: v for k, v in [("steps", args.steps), ("batch_size", args.batch_size)] if v is not None})
    out = Path(args.out) / "vae.pt"
    files = find_audio(args.data)
    k = max(2, round(1 / tc.heldout_fraction))
    heldout = files[k - 1::k] if len(files) >= 2 else []
    train = [f for f in files if f not in heldout]
    clips = [load_audio(f[0])[:, : int(tc.eval_seconds * SAMPLE_RATE)] for f in heldout[:16]]
    print(f"vae: {len(train)} training files, {len(heldout)} held out, under {args.data}")

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)                 # data order and crops
    vae = StereoVAE(cfg)
    disc = Discriminator(cfg) if cfg.gan else None
    opt = torch.optim.AdamW(vae.parameters(), tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), tc.disc_lr, betas=tc.betas, weight_decay=tc.weight_decay) if disc else None
    step = 0
    if out.exists():                                               # resume exactly where it stopped
        ckpt = load_checkpoint(out, "vae")
        if ckpt["config"] != asdict(cfg):
            raise ValueError(f"{out} was trained with another VAE config; pass a new --out or delete it")
        load_state_dict_strict(vae, ckpt["model"], out)
        opt.load_state_dict(ckpt["optimizer"])
        if disc:
            load_state_dict_strict(disc, ckpt["disc"], out)
            opt_d.load_state_dict(ckpt["disc_optimizer"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        gen.set_state(ckpt["rng"]["data"])
        if ckpt["done"] and step >= tc.steps:
            print(f"vae: {out} is trained ({step} steps); skipping")
            return out
        print(f"vae: resuming from step {step}")

    def save(step: int, done: bool) -> None:
        save_checkpoint(out, {"kind": "vae", "config": asdict(cfg), "model": vae.state_dict(),
                              "train_config": asdict(tc), "optimizer": opt.state_dict(),
                              "disc": disc.state_dict() if disc else None,
                              "disc_optimizer": opt_d.state_dict() if disc else None, "step": step, "done": done,
                              "rng": {"torch": torch.get_rng_state(), "data": gen.get_state()}})

    num_samples = int(tc.crop_seconds * SAMPLE_RATE)
    sums, t0 = {}, time.perf_counter()
    vae.train()
    for step in tqdm(range(step, tc.steps), initial=step, total=tc.steps, desc="vae", dynamic_ncols=True):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc, tc.lr)
        audio = crop_batch(train, tc.batch_size, num_samples, gen)
        loss, parts, recon = vae_loss(vae, audio, disc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), tc.grad_clip)
        opt.step()
        if disc:                                                   # LSGAN discriminator step on the same pair
            d_loss = discriminator_loss(disc, audio, recon)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            parts["disc"] = d_loss.item()
        for name, value in {"loss": loss.item(), **parts}.items():
            sums[name] = sums.get(name, 0.0) + value
        done_steps = step + 1
        if done_steps % args.log_every == 0 or done_steps == tc.steps:
            n = done_steps % args.log_every or args.log_every
            ms = 1000 * (time.perf_counter() - t0) / n
            tqdm.write(f"step {done_steps:6d} | " + " ".join(f"{k} {v / n:.4f}" for k, v in sums.items()) +
                       f" | lr {opt.param_groups[0]['lr']:.2e} | {ms:.0f} ms/step")
            sums, t0 = {}, time.perf_counter()
        if clips and (done_steps % args.eval_every == 0 or done_steps == tc.steps):
            vae.eval()
            tqdm.write(f"eval {done_steps:6d} | held-out " +
                       " ".join(f"{k} {v:.4f}" for k, v in evaluate_vae(vae, clips).items()))
            vae.train()
            t0 = time.perf_counter()                              # ms/step counts training only
        if done_steps % args.save_every == 0 and done_steps < tc.steps:
            save(done_steps, done=False)
    vae.eval()
    stats_gen = torch.Generator().manual_seed(args.seed + 1)
    vae.fit_latent_stats(crop_batch(train, 8, num_samples, stats_gen) for _ in range(math.ceil(tc.stats_crops / 8)))
    print(f"vae: latent normalisation fitted, |shift| mean {vae.latent_shift.abs().mean():.3f}, "
          f"scale mean {vae.latent_scale.mean():.3f}")
    save(tc.steps, done=True)
    print(f"vae: saved {out}")
    return out


# -----------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to train")
    what.add_argument("--stage", choices=["vae"], default="vae", help="which stage to run (only vae so far)")
    what.add_argument("--preset", choices=sorted(VAE_PRESETS), default="toy", help="model and schedule size")
    what.add_argument("--data", type=Path, default=None, help="folder searched recursively for .wav/.flac "
                      "(default data/<preset>, where `python copilot.py --out data/<preset>` writes)")
    what.add_argument("--out", type=Path, default=None, help="checkpoint folder (default checkpoints/<preset>)")
    sched = parser.add_argument_group("schedule overrides (default: the preset's)")
    sched.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    sched.add_argument("--batch-size", type=int, default=None, help="crops per step")
    sched.add_argument("--no-gan", action="store_true", help="train without the discriminator even if the preset has it")
    run = parser.add_argument_group("logging and running")
    run.add_argument("--log-every", type=int, default=50, help="print averaged losses and ms/step every N steps")
    run.add_argument("--eval-every", type=int, default=500, help="evaluate on held-out files every N steps")
    run.add_argument("--save-every", type=int, default=200, help="write a resumable checkpoint every N steps")
    run.add_argument("--seed", type=int, default=0, help="seed for weights, crops and posterior noise")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    args.out = args.out or Path("checkpoints") / args.preset
    args.data = args.data or Path("data") / args.preset
    if args.threads:
        torch.set_num_threads(args.threads)
    train_vae(args)


if __name__ == "__main__":
    main()
