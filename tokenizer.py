"""Everything that turns raw data into model inputs and back (paper section 4.1 and appendix B.1).

Top to bottom:
  audio I/O       load_audio, save_audio, resample: float32 [2, S] at 48 kHz; write_atomic, the one file writer
  the stereo VAE  StereoVAE: one DAC-style mono encoder/decoder for both channels, a Gaussian posterior at 40 Hz,
                  latent_dim dims per channel stacked to audio_dim; its losses (STFT on L/R and mid/side,
                  multi-scale mel, KL, multi-period and STFT discriminators) and latent normalisation
  checkpoints     load_checkpoint and load_model, the one loader of every .pt file (strict, errors named)
  text            TextTokenizer over a sentencepiece model (Gemma's, or a toy one from train_text_tokenizer)
  the layout      encode_conversation: Gemma chat turns with audio spans between "<unused0>" and "<unused1>", LM
                  labels on model tokens, span ids for diffusion; task_turns: every task, for train.py and sample.py

    python tokenizer.py --params                                        # VAE preset sizes
    python -m pytest -q tests/test_tokenizer.py
"""
import argparse
import glob
import io
import itertools
import math
import os
import pickle
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import sentencepiece as spm
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

SAMPLE_RATE = 48_000                 # every waveform inside the project, in Hz


# -----------------------------------------------------------------------------
# Audio I/O

class AudioError(ValueError):
    """Audio that cannot be used; the message names the file, the problem and the fix."""


def resample(x: torch.Tensor, orig_sr: int, new_sr: int, zeros: int = 24, rolloff: float = 0.94,
             beta: float = 8.6) -> torch.Tensor:
    """Band-limited resampling of [..., S] from orig_sr to new_sr Hz (Kaiser-windowed sinc, polyphase): with
    new/orig = L/M, output n is the input at time n*M/L through a sinc low-pass at rolloff * min(orig_sr, new_sr) / 2,
    `zeros` zero crossings per side, Kaiser window (beta 8.6: ~80 dB stop band); the L phases are one strided conv1d."""
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
    window = torch.i0(beta * torch.sqrt((1 - (d / zeros) ** 2).clamp(min=0))) / torch.i0(d.new_tensor(beta))
    kernel = (torch.special.sinc(d) * window * cutoff / M).to(x.dtype)
    shape, S = x.shape[:-1], x.shape[-1]
    y = F.pad(x.reshape(-1, 1, S), (width, width + M))
    y = F.conv1d(y, kernel[:, None, :], stride=M)    # [N, L, ceil(S/M)+1]
    y = y.transpose(1, 2).reshape(y.shape[0], -1)
    return y[:, : math.ceil(S * L / M)].reshape(*shape, -1)


MIN_RATE, MAX_RATE = 8_000, 384_000  # Hz: the input sample rates load_audio accepts (README, "Audio input")


def load_audio(path: str | os.PathLike) -> torch.Tensor:
    """Read any file soundfile reads into float32 [2, S] at 48 kHz (resampled, mono duplicated) by the README's
    audio input rules: a missing, undecodable, truncated, empty or non-finite file, more than 2 channels or a rate
    outside MIN_RATE..MAX_RATE is an error; a peak above full scale is scaled down to it, with a note on stderr."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file; check the path")
    try:
        with sf.SoundFile(str(path)) as f:
            data, sr, promised, log = f.read(dtype="float32", always_2d=True), f.samplerate, f.frames, f.extra_info
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{path}: soundfile cannot read it ({e}): a truncated or corrupt file, or a format "
                         f"libsndfile does not read; export it again as WAV or FLAC") from e
    wav = re.search(r"\ndata : (\d+) \(should be (\d+)\)", log)    # libsndfile's note on a WAV cut short
    if wav and int(wav[2]) < int(wav[1]) < 2 ** 32 - 1:
        promised = len(data) * int(wav[1]) / int(wav[2])
    audio, to_48k = torch.from_numpy(data.T.copy()), "resample it, e.g. `ffmpeg -i in -ar 48000 out.wav`"   # [C, S]
    problem = next((msg for bad, msg in (
        (len(data) < promised, f"truncated: its header promises {promised / sr:.2f} s, the file holds "
                               f"{len(data) / sr:.2f} s; copy or export it again"),
        (len(data) == 0, "the file holds no samples; give a non-empty recording"),
        (audio.shape[0] > 2, f"{audio.shape[0]} channels; only mono and stereo are supported, downmix it to stereo "
                             f"first (e.g. `ffmpeg -i in -ac 2 out.wav`)"),
        (not MIN_RATE <= sr <= MAX_RATE, f"sample rate {sr} Hz; accepted rates are {MIN_RATE} to {MAX_RATE} Hz "
                                         f"(at 8 kHz nothing above 4 kHz is left); {to_48k}"),
        (sr * SAMPLE_RATE // math.gcd(sr, SAMPLE_RATE) ** 2 > 10 ** 6,       # resample's [L, M] filter: too big
         f"sample rate {sr} Hz is no simple ratio to 48 kHz; {to_48k}"),
        (not torch.isfinite(audio).all(), "contains NaN or infinite samples; re-export the file")) if bad), None)
    if problem:
        raise AudioError(f"{path}: {problem}")
    peak = float(audio.abs().max())
    if peak >= 0.9999:                               # 16-bit full scale is 32767 / 32768
        print(f"note: {path}: peaks at {peak:.3g} x full scale ({20 * math.log10(peak):+.1f} dBFS), so it may be "
              f"clipped; " + ("scaled down to full scale" if peak > 1 else "read as is"), file=sys.stderr)
    if audio.shape[0] == 1:
        audio = audio.expand(2, -1)                  # mono: the same signal on both channels
    return resample(audio / max(peak, 1.0), sr, SAMPLE_RATE)


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """The one way this project writes a file: write(tmp) fills a temporary file beside `path`, which then
    replaces it (os.replace is atomic), so a crash never leaves half a file, and the temporaries of a killed writer
    of the same file are removed; readable by all (0o644). One writer per file at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)                         # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for stale in path.parent.glob(glob.escape(path.name) + ".*.tmp"):   # left by a killed writer of this file
        stale.unlink(missing_ok=True)


def save_audio(path: str | os.PathLike, audio: torch.Tensor) -> None:
    """Write float [2, S] at 48 kHz atomically; WAV float32 or FLAC 16-bit by the suffix."""
    fmt = {".wav": "WAV", ".flac": "FLAC"}.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported suffix {Path(path).suffix!r}; use .wav or .flac")
    if audio.dim() != 2 or audio.shape[0] != 2:
        raise ValueError(f"save_audio expects a [2, samples] tensor, got shape {tuple(audio.shape)}")
    if not torch.isfinite(audio).all():
        raise AudioError(f"{path}: the audio holds {int((~torch.isfinite(audio)).sum())} NaN or infinite samples "
                         f"(a diverged model or a bad input); nothing was written")
    data, subtype = audio.detach().to("cpu", torch.float32).T.numpy(), "FLOAT" if fmt == "WAV" else "PCM_16"
    write_atomic(path, lambda tmp: sf.write(tmp, data, SAMPLE_RATE, format=fmt, subtype=subtype))


# -----------------------------------------------------------------------------
# The stereo VAE (paper section 4.1 and B.1; building blocks after DAC, bottleneck after Oobleck)

@dataclass
class VAEConfig:
    latent_dim: int = field(default=128, metadata={"help": "dims per channel; audio_dim = 2 * latent_dim (B.1: 128)"})
    encoder_dim: int = field(default=64, metadata={"help": "channels after the first conv; each encoder block doubles"})
    decoder_dim: int = field(default=1536, metadata={"help": "channels into the first decoder block; each halves them"})
    frame_rate: int = field(default=40, metadata={"help": "latent frames per second (B.1: 40); hop = 48000 / rate"})
    strides: tuple[int, ...] = field(default=(2, 6, 10, 10), metadata={"help": "encoder strides; product = the hop"})
    dilations: tuple[int, ...] = field(default=(1, 3, 9), metadata={"help": "a residual unit per dilation (DAC)"})
    chunk_frames: int = field(default=400, metadata={"help": "decode() runs at most this many frames at once"})
    overlap_frames: int = field(default=16, metadata={"help": "context decoded around each chunk and dropped; >= the "
                                                              "decoder's receptive field (6 frames toy, 8 paper)"})
    stft_ffts: tuple[int, ...] = field(default=(2048, 1024, 512, 256, 128), metadata={"help": "STFT loss FFT sizes"})
    mel_windows: tuple[int, ...] = field(default=(32, 64, 128, 256, 512, 1024, 2048), metadata={"help": "mel scales"})
    mel_bins: tuple[int, ...] = field(default=(5, 10, 20, 40, 80, 160, 320), metadata={"help": "mel bands per scale"})
    stft_weight: float = field(default=1.0, metadata={"help": "weight of the STFT term (Oobleck 1.0)"})
    mel_weight: float = field(default=15.0, metadata={"help": "weight of the mel term (DAC 15.0)"})
    kl_weight: float = field(default=1e-4, metadata={"help": "KL to N(0, I), tiny so z stays informative (Oobleck)"})
    gan: bool = field(default=True, metadata={"help": "multi-period + STFT discriminators, feature matching (DAC)"})
    adv_weight: float = field(default=1.0, metadata={"help": "LSGAN generator term (DAC 1.0)"})
    feature_weight: float = field(default=2.0, metadata={"help": "discriminator feature-matching L1 (DAC 2.0)"})
    disc_dim: int = field(default=32, metadata={"help": "base width of each sub-discriminator"})
    disc_periods: tuple[int, ...] = field(default=(2, 3, 5, 7, 11), metadata={"help": "periods (HiFi-GAN)"})
    disc_ffts: tuple[int, ...] = field(default=(2048, 1024, 512), metadata={"help": "STFT discriminators (EnCodec)"})
    # A small, briefly trained VAE loses quiet channels first; coding each channel's level apart keeps the levels,
    # hence the stereo image of a panned sound, by construction (bench/README.md). B.1 is a plain DAC-VAE.
    gain_shape: bool = field(default=False, metadata={"help": "latent dim 0 of each channel is the frame's log RMS "
                                                              "and the networks code the level-normalised waveform"})

    def __post_init__(self):
        if math.prod(self.strides) * self.frame_rate != SAMPLE_RATE:
            raise ValueError(f"VAEConfig.strides {self.strides} multiply to {math.prod(self.strides)}, but a frame "
                             f"at {self.frame_rate} Hz is {SAMPLE_RATE / self.frame_rate:g} samples; make them agree")
        if self.gain_shape and self.latent_dim < 2:
            raise ValueError("VAEConfig.gain_shape spends one latent dim on the level; latent_dim must be >= 2")
        if len(self.mel_windows) != len(self.mel_bins):
            raise ValueError(f"mel_windows {self.mel_windows} and mel_bins {self.mel_bins} need the same length")

    @property
    def hop(self) -> int:                            # samples per latent frame
        return SAMPLE_RATE // self.frame_rate


VAE_PRESETS = {
    # Toy: 10 Hz latents (a quarter of the paper's frames per scene, so the CPU-trained SCT sees 4x more scenes
    # per hour), 32 dims per channel (one the level, gain_shape). The 48 kHz convs dominate the cost, hence
    # stride 4 first and 8 channels. GAN off: its discriminator multiplies the step cost and pays off late.
    "toy": VAEConfig(latent_dim=32, encoder_dim=8, decoder_dim=128, frame_rate=10, strides=(4, 8, 10, 15),
                     dilations=(1, 3), stft_ffts=(1024, 512, 256, 128), gan=False, gain_shape=True),
    # Paper scale (B.1): DAC's widths and four blocks, strides re-chosen for 40 Hz, 128 dims per channel.
    "audiochat": VAEConfig(),
}


def WNConv1d(*args, transpose: bool = False, **kwargs) -> nn.Module:
    """A weight-normalised (transposed) Conv1d (DAC). Bias 0 as in DAC, so silence maps to silence and
    the decoder has no z-independent path to settle into an average sound; weights keep PyTorch's
    default init, not DAC's std 0.02, which shrinks the signal ~6x per conv (a fresh VAE at -50 dB)."""
    conv = (nn.ConvTranspose1d if transpose else nn.Conv1d)(*args, **kwargs)
    nn.init.zeros_(conv.bias)
    return weight_norm(conv)


class Snake1d(nn.Module):
    """Snake activation x + sin^2(alpha x) / alpha with a learned alpha per channel (Ziyin et al., 2020; DAC)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x):
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    """Snake -> dilated conv k7 -> Snake -> conv k1, added to the input; length preserved."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(Snake1d(dim), WNConv1d(dim, dim, 7, dilation=dilation, padding=3 * dilation),
                                   Snake1d(dim), WNConv1d(dim, dim, 1))

    def forward(self, x):
        return x + self.block(x)


def EncoderBlock(dim: int, stride: int, dilations: tuple[int, ...]) -> nn.Module:
    """Residual units at dim // 2 channels, then a strided conv: [N, dim/2, S] -> [N, dim, S / stride]."""
    return nn.Sequential(*[ResidualUnit(dim // 2, d) for d in dilations], Snake1d(dim // 2),
                         WNConv1d(dim // 2, dim, 2 * stride, stride=stride, padding=math.ceil(stride / 2)))


def DecoderBlock(dim: int, stride: int, dilations: tuple[int, ...]) -> nn.Module:
    """A transposed conv, then residual units: [N, dim, F] -> [N, dim / 2, F * stride] (exactly, odd strides too)."""
    up = WNConv1d(dim, dim // 2, 2 * stride, stride=stride, padding=math.ceil(stride / 2),
                  output_padding=stride % 2, transpose=True)
    return nn.Sequential(Snake1d(dim), up, *[ResidualUnit(dim // 2, d) for d in dilations])


GAIN_FLOOR = 1e-5   # gain_shape: RMS floor (-100 dBFS) of a frame's level, so silence normalises to silence


def gain_envelope(log_gain: torch.Tensor, hop: int) -> torch.Tensor:
    """Per-frame log RMS [N, 1, F] -> smooth gain [N, 1, F * hop]: each frame the loudest of itself and its
    neighbours (no onset is divided by a silent neighbour's level), interpolated linearly between frame centres."""
    peak = F.max_pool1d(log_gain, 3, stride=1, padding=1)
    return F.interpolate(peak, scale_factor=hop, mode="linear", align_corners=False).exp()


def frame_log_rms(x: torch.Tensor, hop: int, floor: float = GAIN_FLOOR) -> torch.Tensor:
    """[N, 1, F * hop] -> [N, 1, F] natural log of each frame's RMS, floored at `floor`."""
    return 0.5 * torch.log(x.reshape(x.shape[0], 1, -1, hop).pow(2).mean(-1) + floor ** 2)


class StereoVAE(nn.Module):
    """DAC-VAE-like autoencoder: each channel of [B, 2, S] is encoded alone into latent_dim dims per frame (frame_rate),
    stacked as [left | right] (audio_dim = 2 * latent_dim); with gain_shape dim 0 of each is the frame's log RMS.
    encode() gives the posterior mean normalised per dim (buffers latent_shift/latent_scale, fitted after training
    by fit_latent_stats); decode() takes normalised latents."""
    kind, config_class = "vae", VAEConfig            # what load_model reads from a vae.pt

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = c = config
        self.latent_dim, self.audio_dim = c.latent_dim, 2 * c.latent_dim   # per channel; both channels stacked
        d = c.encoder_dim
        enc = [WNConv1d(1, d, 7, padding=3)]
        for s in c.strides:
            d *= 2
            enc.append(EncoderBlock(d, s, c.dilations))
        self.learned_dim = c.latent_dim - c.gain_shape              # dims the encoder produces per channel
        enc += [Snake1d(d), WNConv1d(d, 2 * self.learned_dim, 3, padding=1)]   # mean | pre-softplus scale
        self.encoder = nn.Sequential(*enc)
        # Start the posterior near its floor (std = softplus(-10) + 1e-4 ~ 1.5e-4): at softplus(0) = 0.69
        # the noise drowns a fresh encoder's ~0.01-scale means and the decoder learns to ignore z.
        nn.init.constant_(self.encoder[-1].bias[self.learned_dim:], -10.0)
        d = c.decoder_dim
        dec = [WNConv1d(self.learned_dim, d, 7, padding=3)]
        for s in reversed(c.strides):
            dec.append(DecoderBlock(d, s, c.dilations))
            d //= 2
        dec += [Snake1d(d), WNConv1d(d, 1, 7, padding=3)]      # no tanh: mixes may exceed full scale (Oobleck)
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("latent_shift", torch.zeros(self.audio_dim))
        self.register_buffer("latent_scale", torch.ones(self.audio_dim))

    @property
    def learned(self) -> torch.Tensor:
        """[audio_dim] bool: the latent dims the encoder learns (all but each channel's level dim with gain_shape)."""
        return torch.arange(self.audio_dim) % self.latent_dim >= int(self.config.gain_shape)

    def posterior(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 2, S] -> (mean, std), each [B, F, audio_dim] with F = ceil(S / hop); unnormalised."""
        if audio.dim() != 3 or audio.shape[1] != 2 or audio.shape[2] == 0:
            raise ValueError(f"StereoVAE expects audio [batch, 2, samples>0], got shape {tuple(audio.shape)}")
        (B, _, S), hop = audio.shape, self.config.hop
        n = math.ceil(S / hop)
        x = F.pad(audio, (0, n * hop - S)).reshape(B * 2, 1, n * hop)       # each channel on its own
        if self.config.gain_shape:
            log_gain = frame_log_rms(x, hop)
            x = x / gain_envelope(log_gain, hop)
        mean, scale = self.encoder(x).chunk(2, dim=1)                        # [B*2, learned_dim, F] each
        std = F.softplus(scale) + 1e-4
        if self.config.gain_shape:                                           # the level dim: exact, no noise
            mean, std = torch.cat([log_gain, mean], 1), torch.cat([torch.full_like(log_gain, 1e-4), std], 1)

        def stack(t):  # [B*2, D, F] -> [B, F, 2*D], left channel first
            return t.reshape(B, 2, self.latent_dim, n).permute(0, 3, 1, 2).reshape(B, n, self.audio_dim)
        return stack(mean), stack(std)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised latents [B, F, audio_dim] -> audio [B, 2, F * hop], in one pass."""
        (B, n, _), hop = z.shape, self.config.hop
        x = z.reshape(B, n, 2, self.latent_dim).permute(0, 2, 3, 1).reshape(B * 2, self.latent_dim, n)
        if not self.config.gain_shape:
            return self.decoder(x).reshape(B, 2, n * hop)
        # The decoder sees the shape dims only, so two channels differing by a gain decode to the same shape;
        # the level is clamped at +12 dBFS so a wild generated latent cannot blow up. Then each frame is scaled
        # to exactly its level dim (the log gain stepped per frame, smoothed over 5 % of a frame: no clicks), so
        # a briefly trained shape decoder cannot play a sound too quietly (a tone came out 15 dB low without).
        level = x[:, :1].clamp(max=math.log(4.0))
        y = self.decoder(x[:, 1:]) * gain_envelope(level, hop)
        g = (level - frame_log_rms(y, hop, 1e-10)).repeat_interleave(hop, dim=-1)
        w = hop // 20 * 2 + 1
        y = y * F.avg_pool1d(F.pad(g, (w // 2, w // 2), mode="replicate"), w, stride=1).exp()
        return y.reshape(B, 2, n * hop)

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: [B, 2, S] -> (reconstruction [B, 2, S] from a posterior sample, mean, std)."""
        mean, std = self.posterior(audio)
        z = mean + std * torch.randn_like(std)
        return self.decode_raw(z)[..., : audio.shape[-1]], mean, std

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, 2, S] at 48 kHz -> normalised posterior mean [B, F, audio_dim]."""
        mean, _ = self.posterior(audio)
        return (mean - self.latent_shift) / self.latent_scale

    def decode(self, z: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        """Normalised latents [B, F, audio_dim] -> audio [B, 2, num_samples or F * hop], chunk_frames at a time
        with overlap_frames of context decoded on each side and dropped: bounded memory, no clicks at the edges."""
        if z.dim() != 3 or z.shape[-1] != self.audio_dim:
            raise ValueError(f"decode expects latents [batch, frames, {self.audio_dim}], got {tuple(z.shape)}")
        z = z * self.latent_scale + self.latent_shift
        n, c, o = z.shape[1], self.config.chunk_frames, self.config.overlap_frames
        pieces = []
        for start in range(0, n, c):
            lo, hi = max(0, start - o), min(n, start + c + o)
            y = self.decode_raw(z[:, lo:hi])
            pieces.append(y[..., (start - lo) * self.config.hop: (min(start + c, n) - lo) * self.config.hop])
        audio = torch.cat(pieces, dim=-1)
        return audio if num_samples is None else audio[..., :num_samples]

    @torch.no_grad()
    def fit_latent_stats(self, batches: Iterable[torch.Tensor]) -> None:
        """Set latent_shift/latent_scale to the per-dim mean and std of the posterior means of batches [B, 2, S]."""
        total, total_sq, count = 0.0, 0.0, 0
        for audio in batches:
            mean = self.posterior(audio)[0].reshape(-1, self.audio_dim).double()
            total, total_sq, count = total + mean.sum(0), total_sq + mean.pow(2).sum(0), count + mean.shape[0]
        if count < 2:
            raise ValueError("fit_latent_stats needs at least two latent frames of audio")
        self.latent_shift.copy_(shift := total / count)
        self.latent_scale.copy_((total_sq / count - shift ** 2).clamp(min=1e-16).sqrt())   # floor: std 1e-8


# -----------------------------------------------------------------------------
# Checkpoints: the one loader of every model file ({"kind", "config", "model"}) and of training checkpoints

class CheckpointError(ValueError):
    """A model file that cannot be used; the message names the file and the fix."""


def load_checkpoint(path: str | os.PathLike, kind: str | None = None) -> dict:
    """torch.load(weights_only=True) of a checkpoint dict on the CPU. A missing, empty, corrupt, hostile or
    other-`kind` file is a CheckpointError naming it and the fix (never weights_only=False: unpickling runs code)."""
    path = Path(path)
    fix = f"restore a good copy, or delete it and run the train.py stage that writes {path.name} again"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; train it first (the train.py stage that writes it)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))   # lazy pages
    except Exception as e:           # whatever torch.load raises, the file is at fault; its advice is not repeated
        code = re.search(r"GLOBAL (\S+)", str(e))        # weights_only refused a reference to code
        why = (f"cannot be read ({e.strerror or e})" if isinstance(e, OSError) else
               "is empty (0 bytes)" if path.stat().st_size == 0 else
               f"refers to {code[1]}, which only running code could rebuild" if code else
               "holds no checkpoint, or more than tensors and plain data" if isinstance(e, pickle.UnpicklingError) else
               "is truncated or corrupt")
        raise CheckpointError(f"{path} {why}; {fix}") from e
    if kind is not None and (not isinstance(ckpt, dict) or ckpt.get("kind") != kind):
        got = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected a {kind!r} checkpoint, found {got!r}; pass the {kind}.pt file")
    return ckpt


def load_state_dict_strict(model: nn.Module, state: dict, path="checkpoint") -> None:
    """load_state_dict(strict=True) with an error that lists the missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [f"{k} {getattr(v, 'shape', type(v).__name__)} (model {tuple(own[k].shape)})" for k, v in state.items()
              if k in own and (not torch.is_tensor(v) or v.shape != own[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{path}: weights do not match {type(model).__name__}: missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}, wrong shapes {shapes[:10]} ({len(missing)}, "
                              f"{len(unexpected)} and {len(shapes)} in all)")
    model.load_state_dict(state, strict=True)


def load_model(cls, path: str | os.PathLike, device="cpu", ckpt: dict | None = None) -> nn.Module:
    """The model of a checkpoint, in eval mode on `device`: cls(config) with its weights loaded strictly; config
    fields this code does not know, or lacks, are an error. cls.kind names the checkpoint kind ("vae", "sct",
    "flam"), cls.config_class its config dataclass; ckpt: the checkpoint dict, when path was read already."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(path, cls.kind)
    # a hand-made file may lack either: every config field or weight is then reported missing, naming the file
    config, state = (ckpt.get(k) if isinstance(ckpt.get(k), dict) else {} for k in ("config", "model"))
    names = {f.name for f in fields(cls.config_class)}
    unknown, missing = sorted(set(config) - names), sorted(names - set(config))
    if unknown or missing:
        raise CheckpointError(f"{path}: {cls.config_class.__name__} mismatch, unknown fields {unknown}, missing fields "
                              f"{missing}; the checkpoint was written by another version of this code")
    try:
        model = cls(cls.config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its config is not a valid {cls.config_class.__name__} ({e}); restore a good "
                              f"copy or train it again") from e
    load_state_dict_strict(model, state, path)
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# VAE losses: multi-resolution STFT (L/R and mid/side), multi-scale mel, KL, GAN with feature matching

def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int = SAMPLE_RATE, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters, peak 1, spaced evenly on the HTK mel scale 2595 log10(1 + f / 700)
    from f_min to f_max (default the Nyquist frequency). The VAE's mel loss and metrics.SmallFLAM use it."""
    m_lo, m_hi = (2595 * math.log10(1 + f / 700) for f in (f_min, sample_rate / 2 if f_max is None else f_max))
    edges = 700 * (10 ** (torch.linspace(m_lo, m_hi, n_mels + 2, dtype=torch.float64) / 2595) - 1)  # Hz
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return torch.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)).clamp(min=0).float()


SILENCE_DB = -80.0   # spectra are floored at the level of white noise at this RMS (dBFS): quieter counts as silence


def _spectrum(x: torch.Tensor, n_fft: int, fb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(|STFT|, log10(|STFT| + floor)) of [..., S] (Hann window n_fft, hop n_fft // 4) -> [..., bins, frames], or
    of fb @ |STFT| with a filterbank fb [bands, bins]. The floor is white noise at SILENCE_DB per bin (band): with
    DAC's 1e-5 clamp, digital silence (half a sparse scene) demands output near -120 dB and dominates the loss,
    and added rather than clamped it still gives a gradient to an output that starts below it."""
    window = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    spec = torch.stft(x.reshape(-1, x.shape[-1]), n_fft, n_fft // 4, window=window, return_complex=True)
    mag = spec.abs().reshape(*x.shape[:-1], *spec.shape[-2:])
    floor = 10 ** (SILENCE_DB / 20) * window.pow(2).sum().sqrt() * x.new_ones(mag.shape[-2], 1)
    if fb is not None:
        mag, floor = fb @ mag, (fb @ floor).clamp(min=1e-12)
    return mag, (mag + floor).log10()


def stft_distance(x: torch.Tensor, y: torch.Tensor, ffts: Iterable[int]) -> torch.Tensor:
    """Multi-resolution STFT distance of [..., S]: mean over FFT sizes of L1 of the floored logs + L1 of |X|, |Y|."""
    total, ffts = 0.0, list(ffts)
    for n_fft in ffts:
        (mx, lx), (my, ly) = _spectrum(x, n_fft), _spectrum(y, n_fft)
        total = total + F.l1_loss(lx, ly) + F.l1_loss(mx, my)
    return total / len(ffts)


def stereo_stft_loss(x: torch.Tensor, y: torch.Tensor, ffts: Iterable[int]) -> torch.Tensor:
    """STFT distance of [B, 2, S] on left/right and on mid/side, averaged (Oobleck); mid/side teaches the image."""
    mid_side = lambda a: torch.stack([a[:, 0] + a[:, 1], a[:, 0] - a[:, 1]], dim=1) / 2   # noqa: E731
    return 0.5 * stft_distance(x, y, ffts) + 0.5 * stft_distance(mid_side(x), mid_side(y), ffts)


def mel_loss(x: torch.Tensor, y: torch.Tensor, windows: Iterable[int], bins: Iterable[int]) -> torch.Tensor:
    """Multi-scale mel distance of [..., S] (DAC): sum over scales of L1(log10 mel(X), log10 mel(Y)), floored."""
    total = 0.0
    for n_fft, n_mels in zip(windows, bins):
        fb = mel_filterbank(n_fft, n_mels).to(x)
        total = total + F.l1_loss(_spectrum(x, n_fft, fb)[1], _spectrum(y, n_fft, fb)[1])
    return total


def kl_loss(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(0, 1)) summed over the latent dims, averaged over batch and frames."""
    return 0.5 * (mean.pow(2) + std.pow(2) - 2 * std.log() - 1).sum(-1).mean()


class ConvStack(nn.Module):
    """Weight-normalised 2-D convs with leaky ReLU, then a 1-channel conv; returns every activation, logits last."""

    def __init__(self, convs: list[nn.Conv2d], post: nn.Conv2d):
        super().__init__()
        self.convs, self.post = nn.ModuleList(map(weight_norm, convs)), weight_norm(post)

    def forward(self, x):
        feats = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            feats.append(x)
        return feats + [self.post(x)]


class PeriodDiscriminator(ConvStack):
    """HiFi-GAN period discriminator: [B, 2, S] folded to [B, 2, S / p, p], 2-D convs along time only."""

    def __init__(self, period: int, dim: int):
        chans = [2, dim, 4 * dim, 16 * dim, 32 * dim, 32 * dim]
        super().__init__([nn.Conv2d(a, b, (5, 1), (3 if i < 4 else 1, 1), padding=(2, 0))
                          for i, (a, b) in enumerate(zip(chans[:-1], chans[1:]))],
                         nn.Conv2d(chans[-1], 1, (3, 1), padding=(1, 0)))
        self.period = period

    def forward(self, x):
        x = F.pad(x, (0, -x.shape[-1] % self.period), mode="reflect")
        return super().forward(x.reshape(*x.shape[:2], -1, self.period))


class STFTDiscriminator(ConvStack):
    """EnCodec-style STFT discriminator on the complex spectrogram of both channels ([B, 4, frames, bins])."""

    def __init__(self, n_fft: int, dim: int):
        super().__init__([nn.Conv2d(4, dim, (3, 9), padding=(1, 4))] + [
            nn.Conv2d(dim, dim, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4)) for d in (1, 2, 4)] + [
            nn.Conv2d(dim, dim, (3, 3), padding=(1, 1))], nn.Conv2d(dim, 1, (3, 3), padding=(1, 1)))
        self.n_fft = n_fft

    def forward(self, x):
        window = torch.hann_window(self.n_fft, device=x.device, dtype=x.dtype)
        spec = torch.stft(x.reshape(-1, x.shape[-1]), self.n_fft, self.n_fft // 4, window=window, return_complex=True)
        spec = torch.view_as_real(spec).reshape(x.shape[0], 2, *spec.shape[-2:], 2)   # [B, 2, bins, frames, re/im]
        return super().forward(spec.permute(0, 1, 4, 3, 2).flatten(1, 2))              # [B, 4, frames, bins]


class Discriminator(nn.Module):
    """Multi-period + STFT discriminators on stereo audio: one feature list per sub-discriminator, logits last."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.discs = nn.ModuleList([PeriodDiscriminator(p, config.disc_dim) for p in config.disc_periods] +
                                   [STFTDiscriminator(n, config.disc_dim) for n in config.disc_ffts])

    def forward(self, audio: torch.Tensor) -> list[list[torch.Tensor]]:
        return [d(audio) for d in self.discs]


def discriminator_loss(disc: Discriminator, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """LSGAN discriminator loss: mean (1 - D(real))^2 + D(fake)^2 over sub-discriminators; fake is detached."""
    loss = 0.0
    for r, f in zip(disc(real), disc(fake.detach())):
        loss = loss + (1 - r[-1]).pow(2).mean() + f[-1].pow(2).mean()
    return loss


def vae_loss(vae: StereoVAE, audio: torch.Tensor, disc: Discriminator | None = None
             ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """Generator objective on a batch [B, 2, S]: (weighted total, its parts as floats, reconstruction)."""
    c = vae.config
    recon, mean, std = vae(audio)
    parts = {"stft": stereo_stft_loss(recon, audio, c.stft_ffts),
             "mel": mel_loss(recon, audio, c.mel_windows, c.mel_bins)}
    learned = vae.learned.to(mean.device)       # gain_shape's level dims are computed, not learned: no KL on them
    parts["kl"] = kl_loss(mean[..., learned], std[..., learned])
    weights = {"stft": c.stft_weight, "mel": c.mel_weight, "kl": c.kl_weight}
    if disc is not None:
        adv, feat = 0.0, 0.0
        for r, f in zip(disc(audio), disc(recon)):
            adv = adv + (1 - f[-1]).pow(2).mean()
            feat = feat + sum(F.l1_loss(b, a.detach()) for a, b in zip(r[:-1], f[:-1])) / (len(r) - 1)
        parts.update(adv=adv, feat=feat)
        weights.update(adv=c.adv_weight, feat=c.feature_weight)
    total = sum(weights[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}, recon


# -----------------------------------------------------------------------------
# Text tokenizer: Gemma's sentencepiece model, or a toy one trained here with the same special pieces

SPECIAL_PIECES = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<unused0>", "<unused1>")


class TextTokenizer:
    """A sentencepiece model exposing Gemma's special tokens, each looked up by its piece name. Audio spans are
    delimited by Gemma's reserved "<unused0>" and "<unused1>", so its 256 000 embeddings stay as they are.
    encode() treats its input as plain text: a user typing "<start_of_turn>" gets those characters as ordinary
    pieces; control tokens enter a sequence only through the layout."""

    def __init__(self, model_file: str | os.PathLike):
        path = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:              # missing, or not a sentencepiece model
            raise CheckpointError(f"{path}: no sentencepiece model ({e}); pass Gemma's tokenizer.model or one "
                                  f"made by train_text_tokenizer()") from e
        self.vocab_size = self.sp.get_piece_size()
        ids = {piece: self.sp.piece_to_id(piece) for piece in SPECIAL_PIECES}
        if missing := [piece for piece, i in ids.items() if self.sp.id_to_piece(i) != piece]:
            raise CheckpointError(f"{path}: the model has no piece {missing[0]!r}; use Gemma's tokenizer.model or one "
                                  f"made by train_text_tokenizer()")
        self.pad_id, self.eos_id, self.bos_id = ids["<pad>"], ids["<eos>"], ids["<bos>"]
        self.start_of_turn_id, self.end_of_turn_id = ids["<start_of_turn>"], ids["<end_of_turn>"]
        self.audio_start_id, self.audio_end_id = ids["<unused0>"], ids["<unused1>"]
        self._special = re.compile("(" + "|".join(map(re.escape, SPECIAL_PIECES)) + ")")

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; no bos/eos added, whitespace and newlines kept, special pieces stay text."""
        ids = []
        for i, chunk in enumerate(self._special.split(text)):   # odd i: a special piece's spelling
            ids += self.sp.encode(chunk[0]) + self.sp.encode(chunk[1:]) if i % 2 else self.sp.encode(chunk)
        return ids

    def decode(self, ids: list[int]) -> str:
        """ids -> text (the inverse of encode)."""
        return self.sp.decode(list(ids))


def train_text_tokenizer(texts: Iterable[str], model_file: str | os.PathLike, vocab_size: int,
                         pieces: tuple[str, ...] = ()) -> TextTokenizer:
    """Train a toy BPE sentencepiece model on texts, write it to model_file and load it. Like Gemma's: <pad> 0,
    <eos> 1, <bos> 2, <unk> 3, the special pieces and "\\n" as pieces of their own, no normalisation (whitespace
    survives), digits split, unseen characters fall back to UTF-8 bytes. Unlike Gemma's, a piece may cross a script
    boundary (`":"` and `"a` merge: plans take ~40 % fewer tokens), and `pieces` are whole pieces (train.py gives
    the plan's numbers, so copying a number from a plan or a prompt is one token, not three)."""
    lines = [line for text in texts for line in text.split("\n") if line]   # sentencepiece reads lines
    if not lines:
        raise ValueError("train_text_tokenizer got no text; pass a non-empty list of strings")
    if vocab_size < 300 + len(pieces):
        raise ValueError(f"vocab_size {vocab_size} is too small: the 256 byte pieces, 9 special pieces and "
                         f"{len(pieces)} given pieces need room; use at least {300 + len(pieces)}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, split_digits=True,
        split_by_unicode_script=False, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, max_sentence_length=1 << 16, minloglevel=2,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=list(SPECIAL_PIECES[4:]) + ["\n"] + list(pieces))
    write_atomic(model_file, lambda tmp: Path(tmp).write_bytes(model.getvalue()))
    return TextTokenizer(model_file)


# -----------------------------------------------------------------------------
# Conversation layout (Gemma chat template with audio spans)
#   <bos><start_of_turn>user\n{parts}<end_of_turn>\n<start_of_turn>model\n{parts}<end_of_turn>\n ...
#   An audio part is <unused0> + F frame positions + <unused1>; adjacent text parts are joined by "\n".

@dataclass
class Turn:
    role: str                      # "user" or "model"
    parts: list                    # in order: text (str) or clean audio latents [F, audio_dim]


@dataclass
class Example:
    """One conversation laid out as one row (no padding). T = sequence length, N = audio spans."""
    ids: torch.Tensor              # [T] long; audio frame positions hold pad_id
    labels: torch.Tensor           # [T] long; labels[i] = ids[i + 1] where that token carries LM loss, else -100
    audio_mask: torch.Tensor       # [T] bool; True at audio frame positions
    span_ids: torch.Tensor         # [T] long; 0 for text, k = 1..N at the frames of the k-th audio span
    span_is_model: torch.Tensor    # [N] bool; span k belongs to a model turn (it gets the diffusion loss)
    latents: torch.Tensor          # [sum F_k, audio_dim] clean latents of every frame, in sequence order


def encode_conversation(turns: list[Turn], tok: TextTokenizer, *, generation_prompt: bool = False,
                        audio_dim: int | None = None) -> Example:
    """Lay out a conversation. LM loss falls on the tokens of model turns only: their text, the <unused0>
    that opens a model audio span, and the model's <end_of_turn>; never on user tokens, turn headers,
    frames or <unused1> (its place is fixed by the span length). generation_prompt=True appends
    "<start_of_turn>model\\n". audio_dim sets the width of `latents` when there is no audio."""
    ids, is_target, span_ids, latents, span_is_model = [tok.bos_id], [False], [0], [], []

    def emit(new, target=False, span=0):
        ids.extend(new)
        is_target.extend([target] * len(new))
        span_ids.extend([span] * len(new))

    for n, turn in enumerate(turns):
        if turn.role not in ("user", "model"):
            raise ValueError(f"turn {n}: role {turn.role!r}; use 'user' or 'model'")
        model = turn.role == "model"
        emit([tok.start_of_turn_id] + tok.encode(turn.role + "\n"))
        parts = [p for text, group in itertools.groupby(turn.parts, key=lambda p: isinstance(p, str))
                 for p in (["\n".join(group)] if text else group)]     # adjacent text parts, joined by "\n"
        for part in parts:
            if isinstance(part, str):
                if not part:
                    raise ValueError(f"turn {n}: empty text part; drop it")
                emit(tok.encode(part), model)
            elif torch.is_tensor(part) and part.dim() == 2 and part.shape[0] > 0:
                audio_dim = audio_dim or part.shape[1]
                if part.shape[1] != audio_dim:
                    raise ValueError(f"turn {n}: audio latents have {part.shape[1]} dims, expected {audio_dim}")
                latents.append(part.float())
                span_is_model.append(model)
                emit([tok.audio_start_id], model)
                emit([tok.pad_id] * part.shape[0], span=len(latents))
                emit([tok.audio_end_id])
            else:
                got = tuple(part.shape) if torch.is_tensor(part) else type(part).__name__
                raise TypeError(f"turn {n}: a part must be text or latents [frames>0, audio_dim], got {got}")
        emit([tok.end_of_turn_id], model)
        emit(tok.encode("\n"))
    if generation_prompt:
        emit([tok.start_of_turn_id] + tok.encode("model\n"))
    labels = torch.where(torch.tensor(is_target[1:] + [False]), torch.tensor(ids[1:] + [-100]), -100)  # pre-shifted
    span_t = torch.tensor(span_ids, dtype=torch.long)
    return Example(ids=torch.tensor(ids, dtype=torch.long), labels=labels, audio_mask=span_t > 0, span_ids=span_t,
                   span_is_model=torch.tensor(span_is_model, dtype=torch.bool),
                   latents=torch.cat(latents) if latents else torch.zeros(0, audio_dim or 0))


# -----------------------------------------------------------------------------
# Task layouts (paper section 3.1, Eqs. 1-3): train.py's documents and sample.py's prompts are both built by
# task_turns, so a request at inference is always a prefix of a training document.

REQUESTS = {   # user wordings per task, varied in training so the model keys on the audio, not on one phrase
    "understand": ("Describe this audio.", "What do you hear in this clip?", "Describe the sound scene.",
                   "List every sound in this recording.", "What is happening in this audio?",
                   "Write the scene plan of this audio."),
    "caption": ("Caption this sound.", "What sound is this?", "Describe this sound in a few words.",
                "Write a short caption for this audio."),
    "asr": ("Transcribe this speech.", "What is being said?", "Write down what you hear.", "Transcribe the recording."),
    "tts": ("Say: {}", "Read this aloud: {}", "Speak the following text: {}", "Please say \"{}\""),
}
DESCRIBE = REQUESTS["understand"][0]   # what sample.py asks to describe a clip

TASK_LAYOUTS = {   # task: (user parts, model parts), in order; plans and captions are copilot.scene_to_json text
    "story": (("instruction",), ("plan", "audio")),         # Eq. 1; a chat's later turn: a story after the turns before
    "upload_edit": (("clip", "instruction"), ("caption", "plan", "audio")),   # Eq. 2: caption the clip, plan the edit
    "understand": (("clip", "request"), ("caption",)),      # describe a clip (its scene with empty edit lists)
    "t2a": (("instruction",), ("audio",)),                  # instruction: the sound's caption
    "tts": (("instruction",), ("audio",)),                  # instruction: a REQUESTS["tts"] wording with the text
    "caption": (("clip", "request"), ("answer",)),          # answer: the sound's caption
    "asr": (("clip", "request"), ("answer",)),              # answer: the transcript
}


def task_turns(task: str, **parts) -> list[Turn]:
    """The chat turns of one task from its named parts (text, or latents [F, audio_dim] for clip and audio). The
    model turn holds the model parts given, in layout order, and is left out when none is: that is the prompt
    sample.py sends (encode_conversation(..., generation_prompt=True) opens the model turn)."""
    user, model = TASK_LAYOUTS[task]
    given = [name for name in model if parts.get(name) is not None]
    missing = [name for name in user if parts.get(name) is None]
    unknown = sorted(set(parts) - set(user) - set(model))
    if missing or unknown or given != list(model[:len(given)]):
        raise ValueError(f"task {task!r} is user {list(user)} -> model {list(model)} (model parts a prefix of "
                         f"these); got {sorted(k for k, v in parts.items() if v is not None)}")
    return [Turn("user", [parts[n] for n in user])] + ([Turn("model", [parts[n] for n in given])] if given else [])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="VAE preset sizes (listening to a trained VAE: bench/bench_vae.py).")
    parser.add_argument("--params", action="store_true", help="print the parameter count of every VAE preset")
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    for name, cfg in VAE_PRESETS.items() if parser.parse_args().params else ():
        vae, disc = StereoVAE(cfg), f"discriminator {count(Discriminator(cfg)):.2f} M" if cfg.gan else "no GAN"
        print(f"{name:10s} VAE {count(vae):6.2f} M (encoder {count(vae.encoder):.2f} M, decoder "
              f"{count(vae.decoder):.2f} M), {disc}, audio_dim {vae.audio_dim}")
