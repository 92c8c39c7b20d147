"""Everything that turns raw data into model inputs and back.

Owns: audio I/O (48 kHz stereo float32, band-limited resampling, mono to stereo), the stereo VAE
(paper section 4.1 and appendix B.1), the text tokenizer, and the chat layout that interleaves text
tokens and audio latents.

Run the tests with `python -m pytest -q tests/test_tokenizer.py`.
"""
import math
import os
import tempfile
from pathlib import Path

import soundfile as sf
import torch
import torch.nn.functional as F

SAMPLE_RATE = 48_000                 # every waveform inside the project, in Hz
FRAME_RATE = 40                      # latent frames per second (paper B.1)
HOP = SAMPLE_RATE // FRAME_RATE      # 1200 samples per latent frame


# -----------------------------------------------------------------------------
# Audio I/O

class AudioError(ValueError):
    """Audio that cannot be used; the message names the file, the problem and the fix."""


def resample(x: torch.Tensor, orig_sr: int, new_sr: int, zeros: int = 24, rolloff: float = 0.94,
             beta: float = 8.6) -> torch.Tensor:
    """Band-limited resampling of [..., S] from orig_sr to new_sr Hz (Kaiser-windowed sinc, polyphase).

    The ratio is reduced to new/orig = L/M. Output sample n sits at input time n*M/L; it is the input
    convolved with a sinc low-pass whose cutoff is rolloff * min(orig_sr, new_sr) / 2, truncated to
    `zeros` zero crossings on each side and tapered by a Kaiser window (beta 8.6 gives about 80 dB of
    stop-band attenuation). The L phases of the filter are applied as one strided conv1d.
    """
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return x
    g = math.gcd(orig_sr, new_sr)
    M, L = orig_sr // g, new_sr // g
    cutoff = rolloff * min(M, L)                     # in cycles per M input samples (Nyquist = min(M, L))
    width = math.ceil(zeros * M / cutoff)            # half-length of the filter, in input samples
    # Filter taps in units of input samples: phase p (output n = k*L + p) needs input k*M + j,
    # at signed distance j - p*M/L from the output instant.
    j = torch.arange(-width, width + M, dtype=torch.float64)
    p = torch.arange(L, dtype=torch.float64)[:, None]
    d = (j[None, :] - p * M / L) * cutoff / M        # distance in zero crossings, [L, K]
    window = torch.i0(beta * torch.sqrt((1 - (d / zeros) ** 2).clamp(min=0))) / torch.i0(torch.tensor(beta, dtype=torch.float64))
    kernel = torch.special.sinc(d) * window * cutoff / M
    kernel = kernel.to(x.dtype)
    shape, S = x.shape[:-1], x.shape[-1]
    y = F.pad(x.reshape(-1, 1, S), (width, width + M))
    y = F.conv1d(y, kernel[:, None, :], stride=M)    # [N, L, ceil(S/M)+1]
    y = y.transpose(1, 2).reshape(y.shape[0], -1)
    return y[:, : math.ceil(S * L / M)].reshape(*shape, -1)


def load_audio(path: str | os.PathLike) -> torch.Tensor:
    """Read any file soundfile reads into float32 [2, S] at 48 kHz (resampled, mono duplicated)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file; check the path")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [S, C]
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{path}: soundfile cannot read it ({e}); convert it to WAV or FLAC") from e
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples; give a non-empty recording")
    if data.shape[1] > 2:
        raise AudioError(f"{path}: {data.shape[1]} channels; only mono and stereo are supported, "
                         f"downmix it to stereo first (e.g. `ffmpeg -i in -ac 2 out.wav`)")
    audio = torch.from_numpy(data.T.copy())          # [C, S]
    if not torch.isfinite(audio).all():
        raise AudioError(f"{path}: contains NaN or infinite samples; re-export the file")
    if audio.shape[0] == 1:
        audio = audio.expand(2, -1).clone()          # mono: the same signal on both channels
    return resample(audio, sr, SAMPLE_RATE)


def save_audio(path: str | os.PathLike, audio: torch.Tensor, subtype: str | None = None) -> None:
    """Write float [2, S] at 48 kHz atomically (temporary file, then rename); format from the suffix."""
    path = Path(path)
    if audio.dim() != 2 or audio.shape[0] != 2:
        raise ValueError(f"save_audio expects a [2, samples] tensor, got shape {tuple(audio.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        fmt = {".wav": "WAV", ".flac": "FLAC"}.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"{path}: unsupported suffix {path.suffix!r}; use .wav or .flac")
        data = audio.detach().to("cpu", torch.float32).T.numpy()
        sf.write(tmp, data, SAMPLE_RATE, format=fmt, subtype=subtype or ("FLOAT" if fmt == "WAV" else "PCM_16"))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
