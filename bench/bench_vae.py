"""Reconstruction quality and stereo image of a trained VAE (tokenizer.StereoVAE).

    python bench/bench_vae.py --ckpt checkpoints/toy/vae.pt --data HELD_OUT_DIR [--write OUT_DIR]

Prints, for the first --seconds of each held-out file, the multi-resolution STFT distance (tokenizer.
stft_distance, FFT 2048..128, on L/R) and SI-SDR per channel, next to a reference measured in the same
run: the same file band-limited by a 16 kHz round trip (resample 48 -> 16 -> 48 kHz), a familiar
yardstick for "how much is lost". Then the stereo image: test sounds panned to p with the
constant-power law L = cos((p+1)pi/4), R = sin((p+1)pi/4) go through encode -> decode, and their
left/right level difference ILD = level_L - level_R (dB) must survive within 1 dB. A hard-panned
sound has a silent channel, so in each signal (input and output alike) a channel's level is floored
at that signal's louder channel minus 40 dB: p = -1 reads +40 dB, and the decoded silent channel must
stay at least 39 dB below the decoded loud one. The ILD is a difference, so an overall gain error
does not count here; it shows in the level table printed after it (each sound at -20 dB RMS, mono).
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tokenizer import (SAMPLE_RATE, StereoVAE, load_audio, load_checkpoint, load_model, resample,  # noqa: E402
                       save_audio, stft_distance)

FFTS = (2048, 1024, 512, 256, 128)
FLOOR_DB = 40.0          # a channel's level is floored at its signal's louder channel's level minus this
PANS = (-1.0, -0.5, 0.0, 0.5, 1.0)


def si_sdr(est: torch.Tensor, ref: torch.Tensor) -> float:
    """Scale-invariant SDR in dB of [S] signals (Le Roux et al., 2019), zero-mean."""
    est, ref = est - est.mean(), ref - ref.mean()
    target = (est @ ref) / (ref @ ref) * ref
    return 10 * math.log10(float(target.pow(2).sum() / (est - target).pow(2).sum().clamp(min=1e-20)))


def level_db(x: torch.Tensor) -> torch.Tensor:
    """RMS level in dB of [..., S]."""
    return 10 * torch.log10(x.pow(2).mean(-1).clamp(min=1e-20))


def test_sounds(seconds: float = 1.0) -> dict[str, torch.Tensor]:
    """Mono test sounds [S] at -20 dB RMS: noise, a harmonic tone, a rising chirp, clicks."""
    g = torch.Generator().manual_seed(0)
    n = int(seconds * SAMPLE_RATE)
    t = torch.arange(n) / SAMPLE_RATE
    fade = torch.clamp(torch.minimum(t, seconds - t) / 0.02, max=1)
    clicks = torch.zeros(n)
    clicks[torch.randint(n, (12,), generator=g)] = 1.0
    clicks = torch.nn.functional.conv1d(clicks[None, None], torch.exp(-torch.arange(200) / 30.0).flip(0)[None, None],
                                        padding=199)[0, 0, :n]
    sounds = {"noise": torch.randn(n, generator=g),
              "tone": sum(torch.sin(2 * math.pi * 440 * k * t) / k for k in range(1, 6)),
              "chirp": torch.sin(2 * math.pi * (200 * t + (6000 - 200) / (2 * seconds) * t ** 2)),
              "clicks": clicks}
    return {k: 0.1 * v * fade / v.pow(2).mean().sqrt() for k, v in sounds.items()}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="trained VAE checkpoint (vae.pt)")
    parser.add_argument("--data", type=Path, required=True, help="folder of held-out .wav/.flac files")
    parser.add_argument("--seconds", type=float, default=4.0, help="evaluate the first N seconds of each file")
    parser.add_argument("--max-files", type=int, default=16, help="evaluate at most this many files")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--write", type=Path, help="also write each reconstruction to OUT_DIR/<name>.wav, to listen")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.ckpt)
    vae = load_model(StereoVAE, args.ckpt)
    print(f"{args.ckpt}: step {ckpt.get('step')}, latent {vae.latent_dim} x 2 = {vae.audio_dim} dims at "
          f"{vae.config.frame_rate} Hz, "
          f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    files = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in (".wav", ".flac"))[: args.max_files]
    if not files:
        raise SystemExit(f"--data {args.data}: no .wav or .flac files")
    print(f"\nreconstruction, first {args.seconds:g} s of {len(files)} files (SI-SDR skipped on silent channels)")
    print(f"{'file':28s} {'STFT dist':>10s} {'SI-SDR L':>9s} {'SI-SDR R':>9s} | {'16k ref STFT':>12s} "
          f"{'SI-SDR L':>9s} {'SI-SDR R':>9s}")
    rows, seconds, elapsed = [], 0.0, 0.0
    for path in files:
        audio = load_audio(path)[:, : int(args.seconds * SAMPLE_RATE)]
        t0 = time.perf_counter()
        recon = vae.decode(vae.encode(audio[None]), audio.shape[-1])[0]
        elapsed, seconds = elapsed + time.perf_counter() - t0, seconds + audio.shape[-1] / SAMPLE_RATE
        if args.write:
            save_audio(args.write / f"{path.stem}.wav", recon)
        ref = resample(resample(audio, SAMPLE_RATE, 16_000), 16_000, SAMPLE_RATE)[:, : audio.shape[-1]]
        row = [stft_distance(recon, audio, FFTS).item()]
        row += [si_sdr(recon[c], audio[c]) if audio[c].abs().max() > 1e-4 else math.nan for c in (0, 1)]
        row += [stft_distance(ref, audio, FFTS).item()]
        row += [si_sdr(ref[c], audio[c]) if audio[c].abs().max() > 1e-4 else math.nan for c in (0, 1)]
        rows.append(row)
        print(f"{path.name[:28]:28s} {row[0]:10.3f} {row[1]:9.2f} {row[2]:9.2f} | {row[3]:12.3f} "
              f"{row[4]:9.2f} {row[5]:9.2f}")
    mean = torch.tensor(rows).nanmean(0).tolist()
    print(f"{'mean':28s} {mean[0]:10.3f} {mean[1]:9.2f} {mean[2]:9.2f} | {mean[3]:12.3f} {mean[4]:9.2f} {mean[5]:9.2f}")
    print(f"encode + decode speed: {seconds / elapsed:.1f}x real time")

    print(f"\nstereo image: ILD = level_L - level_R in dB, levels floored at the louder channel - {FLOOR_DB:g} dB")
    print(f"{'sound':8s} {'pan':>5s} {'ILD in':>8s} {'ILD out':>8s} {'error':>7s}")
    worst = 0.0
    for name, mono in test_sounds().items():
        for p in PANS:
            audio = torch.stack([math.cos((p + 1) * math.pi / 4) * mono, math.sin((p + 1) * math.pi / 4) * mono])
            recon = vae.decode(vae.encode(audio[None]), audio.shape[-1])[0]
            levels = [level_db(x) for x in (audio, recon)]
            ild_in, ild_out = (float(v.clamp(min=v.max() - FLOOR_DB).diff(dim=0).neg()) for v in levels)
            worst = max(worst, abs(ild_out - ild_in))
            print(f"{name:8s} {p:5.1f} {ild_in + 0.0:8.2f} {ild_out + 0.0:8.2f} {ild_out - ild_in + 0.0:7.2f}")
    print(f"worst ILD error {worst:.2f} dB ({'within' if worst <= 1 else 'OUTSIDE'} the 1 dB target)")
    print("\nlevel: output dB RMS of each sound at -20 dB RMS in the centre")
    for name, mono in test_sounds().items():
        recon = vae.decode(vae.encode(torch.stack([mono, mono])[None]), mono.shape[-1])[0]
        print(f"{name:8s} {float(level_db(recon).mean()):7.2f}")


if __name__ == "__main__":
    main()
