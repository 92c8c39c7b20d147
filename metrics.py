"""Evaluation of audio stories: multiFLAM, ΔmultiFLAM, editFLAM, KAD/FAD, tcpWER, plan adherence, and the
StoryGen-Eval tables with control rows (paper section 3.3, Eqs. 4-6, appendix E.1-E.3, Tables 1-3).

The FLAM metrics need a frame-level audio-text scorer (FLAM, Wu et al. 2025): `OpenFLAMScorer` wraps the `openflam`
package with local weights (the paper's); `SmallFLAM` is trained here on copilot scenes, whose per-sound activity is
known frame by frame (`python train.py --preset toy`, stage flam). `plan_adherence` needs none: each sound's onset,
ILD and level measured on the waveform. Functions return raw values; `format_tables` prints the FLAM metrics and
tcpWER x100 as the paper does (KAD is x100 already, as kadtk's; FAD as is).

    python metrics.py --data DIR                     # the control rows, from the copilot eval split DIR/eval alone
    python metrics.py --data DIR --system OUT        # + the System row: OUT written by bench/eval_split.py

OUT/<conversation id>/ holds per turn k (from 0) turn<k>.wav (48 kHz; k = 0: the story of turn 0's instruction; k >= 1:
the edit turn k asks for, given the reference conversation up to turn k-1) and turn<k>.json ({"seconds": time to make
it, "plan": the model's scene or null}), and caption.json ({"seconds", "scene": its description of the reference
turn-0 audio, or null}). What each table scores: `evaluate`; what each row stands for: ROWS.

Test: `python -m pytest -q tests/test_metrics.py`.
"""
import argparse
import json
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path
from typing import Callable, NamedTuple

import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F

import copilot
from tokenizer import SAMPLE_RATE, load_audio, load_model, mel_filterbank, write_atomic

# (audio [2, S] at 48 kHz, captions) -> probabilities [n_captions, n_frames], frames tiling the clip evenly
FrameScorer = Callable[[torch.Tensor, list[str]], torch.Tensor]
Embedder = Callable[[torch.Tensor], torch.Tensor]    # audio [2, S] -> clip embedding [D]


# -----------------------------------------------------------------------------
# The FLAM metrics (appendix E.1-E.3). y is the input audio, y_hat the edited output.

def p_flam(scorer: FrameScorer, caption: str, y: torch.Tensor) -> float:
    """Eq. 13: probability that `caption` occurs in audio y [2, S]: the max of its frame probabilities."""
    return multiflam(scorer, [caption], y)


def multiflam(scorer: FrameScorer, captions: list[str], y: torch.Tensor) -> float:
    """Eq. 4: the mean over the plan's captions X_m of P_FLAM(X_m, y) (Eq. 13)."""
    if not captions:
        raise ValueError("multiFLAM needs at least one caption; skip scenes without sounds")
    probs = scorer(y, list(captions))
    if probs.dim() != 2 or probs.shape[0] != len(captions):
        raise ValueError(f"a FrameScorer must return [n_captions={len(captions)}, n_frames], got {tuple(probs.shape)}")
    return float(probs.amax(dim=1).mean())


def delta_multiflam(scorer: FrameScorer, kept: list[str], y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Eq. 14: |multiFLAM(X', y) - multiFLAM(X', y_hat)| where kept = X' = X - {e}, the sounds to leave alone."""
    return abs(multiflam(scorer, kept, y) - multiflam(scorer, kept, y_hat))


def editflam_add(scorer: FrameScorer, caption: str, y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Eq. 15: P(X, y_hat) - P(X, y); positive when the sound was added."""
    return p_flam(scorer, caption, y_hat) - p_flam(scorer, caption, y)


def editflam_remove(scorer: FrameScorer, caption: str, y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Eq. 16: P(X, y) - P(X, y_hat); positive when the sound was removed."""
    return p_flam(scorer, caption, y) - p_flam(scorer, caption, y_hat)


def editflam_change(scorer: FrameScorer, old: str, new: str, y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Eq. 17: the mean of adding X2 = new and removing X1 = old."""
    return (editflam_add(scorer, new, y, y_hat) + editflam_remove(scorer, old, y, y_hat)) / 2


def editflam_acoustic(scorer: FrameScorer, caption: str, y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Eq. 18: 1 - |P(X, y_hat) - P(X, y)| for volume or panning edits; 1 when the sound is still there."""
    return 1.0 - abs(p_flam(scorer, caption, y_hat) - p_flam(scorer, caption, y))


def flam_caption(sound: dict) -> str:
    """The text FLAM scores for one sound of a scene (the paper's JSON): the sfx caption, or its speaker."""
    speaker = {"male": "a man speaking", "female": "a woman speaking"}.get(sound.get("gender"), "a person speaking")
    return speaker if sound["tool"] == "tts" else sound["text"]


def edit_scores(scorer: FrameScorer, before: dict, after: dict, y: torch.Tensor,
                y_hat: torch.Tensor) -> tuple[float | None, float | None]:
    """(ΔmultiFLAM, editFLAM) of one edit turn; None where it has no kept or no edited sound. The edited sounds are the
    ids the new plan lists in added/removed/changed; editFLAM is their mean of add (Eq. 15), remove (Eq. 16), change
    (Eq. 17, a changed caption) or acoustic (Eq. 18, the caption kept: volume, pan, timing); an open edit mixes these.
    ΔmultiFLAM uses every sound of the input plan that was not edited."""
    old, new = ({s["id"]: s for s in scene["text"]} for scene in (before, after))
    edited = set(after["added"]) | set(after["removed"]) | set(after["changed"])
    terms = [editflam_add(scorer, flam_caption(new[i]), y, y_hat) for i in after["added"]]
    terms += [editflam_remove(scorer, flam_caption(old[i]), y, y_hat) for i in after["removed"]]
    for i in after["changed"]:
        a, b = flam_caption(old[i]), flam_caption(new[i])
        terms.append(editflam_change(scorer, a, b, y, y_hat) if a != b else editflam_acoustic(scorer, a, y, y_hat))
    kept = [flam_caption(s) for i, s in old.items() if i not in edited]
    return delta_multiflam(scorer, kept, y, y_hat) if kept else None, sum(terms) / len(terms) if terms else None


# -----------------------------------------------------------------------------
# OpenFLAM, the paper's scorer (optional; non-commercial licence, pins old torch/transformers)

class OpenFLAMScorer:
    """FrameScorer over `openflam` (Wu et al. 2025) with local weights: `OpenFLAMScorer(DIR)(audio, captions)`.
    OpenFLAM takes mono 48 kHz in exactly 10 s windows, 32 frames each (its time axis is interpolated, so shorter input
    would be stretched): downmix, zero-pad to whole windows, score each with the unbiased frame map, concatenate, and
    drop the frames that start in the padding. Its text encoder (roberta-base) comes from the Hugging Face cache."""
    WINDOW = 10 * SAMPLE_RATE      # samples per window
    FRAMES = 32                    # frames per window: 0.3125 s each

    def __init__(self, ckpt_dir: str | Path, device: str = "cpu"):
        try:
            import openflam
        except ImportError as e:
            raise ImportError("OpenFLAMScorer needs the `openflam` package: `pip install openflam` (its pinned torch "
                              "and transformers call for a separate virtual environment), or use SmallFLAM") from e
        if not (ckpt := Path(ckpt_dir) / "open_flam_oct17.pth").is_file():
            raise FileNotFoundError(f"{ckpt}: OpenFLAM weights not found; download open_flam_oct17.pth from "
                                    f"https://huggingface.co/kechenadobe/OpenFLAM into {ckpt_dir}")
        self.device, self.model = device, openflam.OpenFLAM(model_name="v1-base", default_ckpt_path=str(ckpt_dir))
        self.model.to(device).eval()

    def _windows(self, audio: torch.Tensor) -> tuple[torch.Tensor, int]:
        n = math.ceil(audio.shape[-1] / self.WINDOW)
        x = F.pad(audio.mean(0), (0, n * self.WINDOW - audio.shape[-1])).view(n, self.WINDOW)   # mono windows
        return x.to(self.device), math.ceil(audio.shape[-1] * self.FRAMES / self.WINDOW)

    def __call__(self, audio: torch.Tensor, captions: list[str]) -> torch.Tensor:
        x, keep = self._windows(audio)
        with torch.no_grad():
            s = self.model.get_local_similarity(x, captions, method="unbiased", cross_product=True)  # [n, N, 32]
        return s.permute(1, 0, 2).reshape(len(captions), -1)[:, :keep].float().cpu()

    def clip_embedding(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio [2, S] -> [512], OpenFLAM's global embedding averaged over the 10 s windows."""
        with torch.no_grad():
            return self.model.get_global_audio_features(self._windows(audio)[0]).mean(0).float().cpu()


# -----------------------------------------------------------------------------
# SmallFLAM: a frame-wise language-audio model small enough to train on the toy world

@dataclass
class FLAMConfig:
    """SmallFLAM: a log-mel conv audio encoder and a byte transformer text encoder, scored frame by frame."""
    n_fft: int = field(default=2048, metadata={"help": "STFT size at 48 kHz (43 ms window)"})
    mel_hop: int = field(default=480, metadata={"help": "STFT hop in samples: 100 mel frames per second"})
    n_mels: int = field(default=64, metadata={"help": "mel bands (as OpenFLAM)"})
    f_min: float = field(default=50.0, metadata={"help": "lowest mel band edge, Hz (as OpenFLAM)"})
    f_max: float = field(default=14_000.0, metadata={"help": "highest mel band edge, Hz (as OpenFLAM)"})
    pool: int = field(default=10, metadata={"help": "mel frames per output frame: 10 output frames per second"})
    width: int = field(default=128, metadata={"help": "channels of the audio encoder, width of the text encoder"})
    audio_layers: int = field(default=4, metadata={"help": "dilated residual conv blocks (dilations 1, 2, 4, ...)"})
    text_layers: int = field(default=2, metadata={"help": "transformer layers over the caption's UTF-8 bytes"})
    text_heads: int = field(default=4, metadata={"help": "attention heads of the text encoder"})
    max_text_len: int = field(default=128, metadata={"help": "bytes per caption; longer captions are truncated"})
    embed_dim: int = field(default=128, metadata={"help": "shared audio-text embedding size"})
    logit_scale_init: float = field(default=math.log(10.0), metadata={"help": "log alpha(t) at init (FLAM: 10)"})
    logit_bias_init: float = field(default=-4.0, metadata={"help": "beta(t) at init: most pairs are negatives"})

    @property
    def hop_samples(self) -> int:  # samples per output frame
        return self.mel_hop * self.pool


FLAM_PRESETS = {
    "toy": FLAMConfig(width=64, audio_layers=3, text_layers=1, embed_dim=64),
    "audiochat": FLAMConfig(width=512, audio_layers=8, text_layers=4, text_heads=8, embed_dim=512),
}


class SmallFLAM(nn.Module):
    """Log-mel conv encoder (10 Hz frames) + byte transformer text encoder, scored as FLAM does: p = sigmoid(alpha(t)
    cos(a, t) + beta(t)), per-text scale and bias, trained with a frame-wise BCE over every caption of the world on
    every clip (flam_batch), so beta(t) is calibrated to the world the metrics score and p is the frame probability.
    FLAM's unbiased map p / (p + sigmoid(beta)) is 0.5 wherever cos = 0: it put absent sounds near 0.5 (bench/)."""
    kind, config_class = "flam", FLAMConfig          # what tokenizer.load_model reads from a flam.pt

    def __init__(self, config: FLAMConfig):
        super().__init__()
        c = self.config = config
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)
        self.register_buffer("mel_fb", mel_filterbank(c.n_fft, c.n_mels, SAMPLE_RATE, c.f_min, c.f_max), False)
        self.audio_in = nn.Conv1d(c.n_mels, c.width, kernel_size=3, padding=1)
        self.audio_pool = nn.Conv1d(c.width, c.width, kernel_size=c.pool, stride=c.pool)
        self.audio_blocks = nn.ModuleList(nn.Sequential(
            nn.GroupNorm(1, c.width), nn.GELU(), nn.Conv1d(c.width, c.width, 3, padding=2 ** i, dilation=2 ** i),
            nn.GELU(), nn.Conv1d(c.width, c.width, 1)) for i in range(c.audio_layers))
        self.audio_out = nn.Linear(c.width, c.embed_dim)
        self.byte_emb = nn.Embedding(257, c.width)           # 256 byte values + padding id 256
        self.pos_emb = nn.Embedding(c.max_text_len, c.width)
        layer = nn.TransformerEncoderLayer(c.width, c.text_heads, 4 * c.width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.text_encoder = nn.TransformerEncoder(layer, c.text_layers, enable_nested_tensor=False)
        self.text_out = nn.Linear(c.width, c.embed_dim)
        self.text_scale, self.text_bias = (nn.Sequential(nn.Linear(c.width, c.width), nn.GELU(), nn.Linear(c.width, 1))
                                           for _ in range(2))
        for head, init in ((self.text_scale, c.logit_scale_init), (self.text_bias, c.logit_bias_init)):
            nn.init.zeros_(head[-1].weight)                   # alpha and beta start constant across texts
            nn.init.constant_(head[-1].bias, init)

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, 2, S] -> [B, n_mels, pool * F], mono, zero-padded to F = ceil(S / hop_samples) frames."""
        n = math.ceil(audio.shape[-1] / self.config.hop_samples) * self.config.hop_samples
        x = F.pad(audio.mean(1), (0, n - audio.shape[-1]))
        spec = torch.stft(x, self.config.n_fft, self.config.mel_hop, window=self.window, center=True,
                          pad_mode="constant", return_complex=True).abs().pow(2)[..., :-1]
        return (torch.log(self.mel_fb @ spec + 1e-5) + 5.0) / 5.0  # roughly centred for the first conv

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, 2, S] at 48 kHz -> frame embeddings [B, F, embed_dim] at 10 Hz."""
        h = self.audio_pool(F.gelu(self.audio_in(self.log_mel(audio))))   # [B, W, F]
        for block in self.audio_blocks:
            h = h + block(h)
        return self.audio_out(h.transpose(1, 2))

    def embed_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """N captions -> (embeddings [N, embed_dim], alpha [N], beta [N])."""
        data = [c.encode("utf-8")[: self.config.max_text_len] for c in captions]
        if not all(data):
            raise ValueError(f"SmallFLAM got an empty caption in {captions!r}; give every sound a description")
        ids = nn.utils.rnn.pad_sequence([torch.tensor(list(b)) for b in data], True, 256).to(self.pos_emb.weight.device)
        pad = ids == 256
        h = self.text_encoder(self.byte_emb(ids) + self.pos_emb.weight[: ids.shape[1]], src_key_padding_mask=pad)
        h = (h * ~pad[..., None]).sum(1) / (~pad).sum(1, keepdim=True)  # mean over the caption's bytes
        return self.text_out(h), self.text_scale(h).exp().squeeze(-1), self.text_bias(h).squeeze(-1)

    def logits(self, audio: torch.Tensor, captions: list[list[str]]) -> torch.Tensor:
        """audio [B, 2, S], K captions per clip -> logits alpha(t) cos(a, t) + beta(t) [B, K, F]."""
        B, K = len(captions), len(captions[0])
        if any(len(cs) != K for cs in captions):
            raise ValueError(f"every clip needs the same number of captions, got {[len(cs) for cs in captions]}")
        a = F.normalize(self.embed_audio(audio), dim=-1)                        # [B, F, D]
        t, alpha, beta = self.embed_text([c for cs in captions for c in cs])
        cos = torch.einsum("bkd,bfd->bkf", F.normalize(t, dim=-1).view(B, K, -1), a)
        return alpha.view(B, K, 1) * cos + beta.view(B, K, 1)

    def loss(self, audio: torch.Tensor, captions: list[list[str]], targets: torch.Tensor) -> torch.Tensor:
        """FLAM's frame-wise sigmoid loss: BCE over every (clip, caption, frame); targets [B, K, F] in [0, 1]."""
        logits = self.logits(audio, captions)
        if targets.shape != logits.shape:
            raise ValueError(f"targets {tuple(targets.shape)} do not match the logits {tuple(logits.shape)} [B, K, F]")
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits))

    @torch.no_grad()
    def score(self, audio: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """FrameScorer: audio [2, S] -> frame probabilities p = sigmoid(alpha cos + beta) [N, F] (class docstring)."""
        if audio.dim() != 2 or audio.shape[0] != 2:
            raise ValueError(f"SmallFLAM.score expects audio [2, samples], got {tuple(audio.shape)}")
        return self.logits(audio[None].to(self.window.device), [list(captions)])[0].sigmoid().cpu()

    @torch.no_grad()
    def clip_embedding(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio [2, S] -> [embed_dim], the mean of the frame embeddings (for KAD/FAD)."""
        return self.embed_audio(audio[None].to(self.window.device))[0].mean(0).cpu()


# -----------------------------------------------------------------------------
# SmallFLAM data: frame targets from activity intervals, batches, detection quality

@dataclass
class LabelledClip:
    audio: Path | torch.Tensor                       # a 48 kHz file, or [2, S] at 48 kHz
    events: dict[str, list[tuple[float, float]]]     # caption -> intervals (s) in which it is active


def frame_targets(intervals: list[tuple[float, float]], num_frames: int, frame_s: float) -> torch.Tensor:
    """[num_frames] fraction of each frame [f frame_s, (f + 1) frame_s) covered by the union of intervals (1 %)."""
    t = (torch.arange(num_frames * 100, dtype=torch.float64) + 0.5) * frame_s / 100     # 100 points per frame
    on = torch.zeros_like(t, dtype=torch.bool)
    for s, e in intervals:
        on |= (t >= s) & (t < e)
    return on.view(num_frames, 100).float().mean(1)


def flam_clips(conversations) -> list[LabelledClip]:
    """Every turn of copilot conversations as a LabelledClip: each sound's FLAM caption and activity."""
    clips = []
    for turn in (turn for conv in conversations for turn in conv.turns):
        events = defaultdict(list)
        for sound in _scene(turn.scene)["text"]:
            events[flam_caption(sound)] += [tuple(iv) for iv in turn.activity.get(sound["id"], [])]
        clips.append(LabelledClip(Path(turn.audio), dict(events)))
    return clips


def flam_batch(clips: list[LabelledClip], pool: list[str], k: int, rng: random.Random,
               hop_samples: int = 4800) -> tuple[torch.Tensor, list[list[str]], torch.Tensor]:
    """Training batch: audio [B, 2, S] (zero-padded), n = min(k, len(pool)) captions per clip, targets [B, n, F] at
    hop_samples per frame. A clip's captions are its sounds (at most n), then pool captions absent from it; k >= the
    pool scores every caption on every clip (the toy world's 15), so no hard negative is missed. The toy world writes
    one caption per class, so a caption's target is its class's activity (the union over the clip's sounds of that
    class); padded frames are silent negatives."""
    audio = [c.audio if isinstance(c.audio, torch.Tensor) else load_audio(c.audio) for c in clips]
    S, n = max(a.shape[-1] for a in audio), min(k, len(pool))
    num_frames = math.ceil(S / hop_samples)
    captions, targets = [], []
    for clip in clips:
        pos = rng.sample(list(clip.events), n) if len(clip.events) > n else list(clip.events)
        caps = pos + rng.sample([c for c in pool if c not in clip.events], n - len(pos))   # len(pool) >= n
        captions.append(caps)
        targets.append(torch.stack([frame_targets(clip.events.get(c, []), num_frames, hop_samples / SAMPLE_RATE)
                                    for c in caps]))
    return torch.stack([F.pad(a, (0, S - a.shape[-1])) for a in audio]), captions, torch.stack(targets)


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting 1/2 (rank form)."""
    s, y = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs positives and negatives, got {n_pos} and {n_neg}")
    sorted_s, order = s.sort()
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ranks = (counts.cumsum(0) - (counts - 1) / 2)[inverse]           # 1-based mean rank of each tie group
    return float((ranks[y[order]].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection_quality(scorer: FrameScorer, clips: list[LabelledClip], pool: list[str] | None = None,
                      threshold: float = 0.5) -> dict[str, float]:
    """Detection on held-out clips, every pool caption scored on every frame of every clip: frame AUROC, frame F1
    at `threshold` (a frame is positive when a caption's intervals cover at least half of it), and "clip": the
    share of (present caption, absent caption) pairs of a clip whose P_FLAM (Eq. 13) puts the present one higher."""
    pool = pool or sorted({c for clip in clips for c in clip.events})
    scores, labels, right, pairs = [], [], 0.0, 0
    for clip in clips:
        audio = clip.audio if isinstance(clip.audio, torch.Tensor) else load_audio(clip.audio)
        probs = scorer(audio, pool)                                   # [N, F]
        frame_s = audio.shape[-1] / SAMPLE_RATE / probs.shape[1]
        scores.append(probs.flatten())
        labels.append(torch.cat([frame_targets(clip.events.get(c, []), probs.shape[1], frame_s) >= 0.5 for c in pool]))
        top, present = probs.amax(1), torch.tensor([c in clip.events for c in pool])
        diff = top[present, None] - top[None, ~present]                # [present, absent]
        right, pairs = right + float((diff > 0).sum() + 0.5 * (diff == 0).sum()), pairs + diff.numel()
    s, y = torch.cat(scores), torch.cat(labels)
    tp, fp, fn = int(((s >= threshold) & y).sum()), int(((s >= threshold) & ~y).sum()), int(((s < threshold) & y).sum())
    return {"auroc": auroc(s, y), "f1": 2 * tp / max(2 * tp + fp + fn, 1), "clip": right / max(pairs, 1)}


# -----------------------------------------------------------------------------
# KAD and FAD over clip embeddings

def kad(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Kernel Audio Distance (Chung et al. 2025): unbiased MMD^2 of reference x [m, D] and evaluated y [n, D], x100 as
    kadtk; kernel exp(-|a - b|^2 / (2 h^2)), h = the median distance within x. 0 in expectation for equal laws."""
    x, y, m, n = x.double(), y.double(), len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"KAD needs at least 2 embeddings per set, got {m} and {n}")
    h = bandwidth or float(torch.pdist(x).median())
    kxx, kyy, kxy = (torch.exp(-torch.cdist(a, b).pow(2) / (2 * h * h)) for a, b in ((x, x), (y, y), (x, y)))
    return 100 * float((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1))
                       - 2 * kxy.mean())


def fad(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance of Gaussians fitted to x [m, D] and y [n, D]: |mu_x - mu_y|^2 + Tr(Sx + Sy - 2 (Sx Sy)^1/2);
    Tr (Sx Sy)^1/2 = sum of sqrt eigenvalues of Sx^1/2 Sy Sx^1/2 (symmetric PSD), so no scipy is needed."""
    x, y = x.double(), y.double()
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"FAD needs at least 2 embeddings per set, got {len(x)} and {len(y)}")
    sx, sy = torch.cov(x.T), torch.cov(y.T)
    w, v = torch.linalg.eigh(sx)
    root = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T                # Sx^1/2
    tr_covmean = torch.linalg.eigvalsh(root @ sy @ root).clamp(min=0).sqrt().sum()
    return float((x.mean(0) - y.mean(0)).pow(2).sum() + sx.trace() + sy.trace() - 2 * tr_covmean)


# -----------------------------------------------------------------------------
# tcpWER: time-constrained minimum-permutation WER (meeteval doc/tcpwer.md)

Segment = tuple[str, float, float, str]   # (speaker, start s, end s, words)


class WordErrors(NamedTuple):
    errors: int                           # insertions + deletions + substitutions, best speaker assignment
    length: int                           # reference words


def _word_streams(segments: list[Segment], collar: float | None) -> dict[str, list]:
    """Speaker -> [(word, (start, end))] in segment order, timed as meeteval's defaults: a segment is split in
    proportion to word lengths in characters (reference); a hypothesis word is the centre of its share,
    widened by the collar on each side."""
    streams = defaultdict(list)
    for spk, start, end, text in sorted(segments, key=lambda s: s[1]):
        words = text.split()
        char_s, offset = (end - start) / max(sum(map(len, words)), 1), 0
        for w in words:
            a, b = start + char_s * offset, start + char_s * (offset + len(w))
            offset, centre = offset + len(w), (a + b) / 2
            streams[spk].append((w, (a, b) if collar is None else (centre - collar, centre + collar)))
    return streams


def _tc_levenshtein(ref: list, hyp: list) -> int:
    """Edit distance where two words may be matched or substituted only if their time intervals overlap."""
    row = list(range(len(hyp) + 1))
    for r_word, (r0, r1) in ref:
        diag, row[0] = row[0], row[0] + 1
        for j, (h_word, (h0, h1)) in enumerate(hyp, 1):
            best = min(row[j] + 1, row[j - 1] + 1, diag + (r_word != h_word) if r0 < h1 and r1 > h0 else math.inf)
            diag, row[j] = row[j], best
    return row[-1]


def tcpwer(ref: list[Segment], hyp: list[Segment], collar: float = 1.0) -> WordErrors:
    """tcpWER counts: the minimum over speaker assignments of time-constrained word errors (paper: 1 s collar)."""
    r, h = _word_streams(ref, None), _word_streams(hyp, collar)
    rs, hs, n = list(r), list(h), max(len(r), len(h))
    if n > 8:
        raise ValueError(f"tcpwer tries every speaker assignment; {n} speakers is too many (at most 8)")
    cost = [[_tc_levenshtein(r[rs[i]] if i < len(rs) else [], h[hs[j]] if j < len(hs) else []) for j in range(n)]
            for i in range(n)]   # an unmatched speaker costs all its words (deletions or insertions)
    errors = min((sum(cost[i][p[i]] for i in range(n)) for p in permutations(range(n))), default=0)
    return WordErrors(errors, sum(map(len, r.values())))


# -----------------------------------------------------------------------------
# Plan adherence measured on the waveform: each event sound's onset, ILD and level, no learned scorer

ILD_CLIP = 30.0    # dB: the pan law's ILD is infinite at |p| = 1, so planned and measured ILDs are clipped here


def ild_db(left: float, right: float) -> float:
    """Interaural level difference of two amplitudes in dB (+ = left louder), clipped at +-ILD_CLIP."""
    return max(-ILD_CLIP, min(ILD_CLIP, 20 * math.log10(max(left, 1e-9) / max(right, 1e-9))))


def plan_adherence(audio: torch.Tensor, scene) -> list[dict]:
    """Per event sound (all but the ambiences) of `scene` (a copilot Scene or its JSON) in audio [2, S] at 48 kHz:
    {"id", "heard", "onset" s, "ild" dB, "level" LU}, errors measured minus planned (None when not heard); [] unless
    the events are apart in time and leave a moment without any. On 10 ms frames: the bed is measured 0.1 s clear of
    the events (mean power per channel, K-weighted, a floor 3 dB over its 95th percentile); each sound in its gap
    (previous event's end to next one's start) is heard when its peak frame reaches the floor; onset: the first frame
    reaching max(floor, peak - 20 dB), against start_time; ILD: the channels' power over those frames less the bed's,
    against the pan law, both clipped at +-30 dB (beyond 6 dB the bed's fluctuations swamp the quiet channel, but a
    centred bed adds alike to LL, LR and RR, so there g_L / g_R = (C_LL - C_LR) / (C_LR - C_RR)); level: BS.1770 of
    the blocks overlapping the planned interval, the bed's K-weighted power subtracted, against the plan's loudness."""
    scene = copilot.parse_scene(scene) if isinstance(scene, dict) else scene
    beds = set(copilot.ambience_ids(scene))
    events = sorted((s for s in scene.sounds if s.id not in beds), key=lambda s: s.start_time)
    hop, n = SAMPLE_RATE // 100, audio.shape[-1] // (SAMPLE_RATE // 100)
    t = torch.arange(n) / 100                                                  # frame starts, s
    quiet = torch.ones(n, dtype=torch.bool)
    for s in events:
        quiet &= (t + 0.01 <= s.start_time - 0.1) | (t >= s.end + 0.1)
    if not events or not quiet.any() or any(a.end > b.start_time for a, b in zip(events, events[1:])):
        return []
    x = audio[:, :n * hop].double().unflatten(-1, (n, hop))                  # [2, F, hop]
    C = torch.stack([x[0].pow(2), x[0] * x[1], x[1].pow(2)]).mean(-1)        # [3, F]: C_LL, C_LR, C_RR per frame
    K = copilot.k_weight(audio[:, :n * hop]).pow(2).unflatten(-1, (n, hop)).mean(-1).sum(0)   # [F] K-weighted
    total, bed, bed_k = C[0] + C[2], C[:, quiet].mean(1), K[quiet].mean()
    floor, out = 2 * float(total[quiet].quantile(0.95)), []
    for j, s in enumerate(events):
        gap = (t >= (events[j - 1].end if j else 0)) & (t < (events[j + 1].start_time if j + 1 < len(events) else 1e9))
        above = gap & (total > max(floor, float(total[gap].max()) / 100 if gap.any() else math.inf))
        if not above.any():
            out.append({"id": s.id, "heard": False, "onset": None, "ild": None, "level": None})
            continue
        ll, lr, rr = C[:, above].mean(1).tolist()
        ild = ild_db(max(ll - bed[0], 0) ** 0.5, max(rr - bed[2], 0) ** 0.5)
        ild = ild_db(abs(ll - lr), abs(lr - rr)) if abs(ild) > 6 else ild
        blocks = (K[gap & (t > s.start_time - 0.4) & (t < s.end + 0.4)] - bed_k).clamp(min=0)
        blocks = blocks.unfold(0, 40, 10).mean(-1) if len(blocks) >= 40 else blocks.mean()[None]
        out.append({"id": s.id, "heard": True, "onset": float(t[above][0]) - s.start_time,
                    "ild": ild - ild_db(*copilot.pan_gains(s.panning)),
                    "level": copilot.gated_loudness(blocks) - s.loudness})
    return out


# -----------------------------------------------------------------------------
# StoryGen-Eval style evaluation, with control rows: what a right and a wrong answer score

ROWS = {   # the tables' rows: what stands in for a system's output (all but System are controls)
    "Topline": "the copilot's renders and plans themselves (the reference)",
    "Unchanged": "editing: the input returned as the output (Table 1's DiT failure)",
    "Regenerated": "editing: the edited plan rendered afresh with another renderer seed: right sounds, not the input's",
    "Shuffled": "each conversation's plan scored on the next conversation's audio (understanding: its plan as caption)",
    "Silence": "silent audio as long as the reference (understanding: an empty description)",
    "System": "the --system folder (bench/eval_split.py)",
}


def _scene(scene) -> dict:
    """A copilot Scene (or the paper's JSON as a dict) -> the paper's JSON dict."""
    return scene if isinstance(scene, dict) else json.loads(copilot.scene_to_json(scene))


def _speech(scene: dict) -> list[Segment]:
    """The speech sounds of a scene as tcpWER segments; case and punctuation do not count."""
    return [(s.get("speaker", "?"), s["start_time"], s["start_time"] + s["duration"],
             re.sub(r"[^\w' ]+", " ", s["text"].lower())) for s in scene["text"] if s["tool"] == "tts"]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _memo(scorer: FrameScorer) -> FrameScorer:
    """The scorer, called once per (audio, caption): the rows score the same clips with the same captions."""
    seen = {}                                                  # id(audio) -> (audio, kept alive; {caption: [F]})

    def score(audio, captions):
        rows = seen.setdefault(id(audio), (audio, {}))[1]
        if new := [c for c in dict.fromkeys(captions) if c not in rows]:
            rows.update(zip(new, scorer(audio, new)))
        return torch.stack([rows[c] for c in captions])
    return score


def regenerate(scene: dict, seed: str) -> torch.Tensor:
    """The Regenerated row's output [2, S]: `scene` rendered afresh by the copilot's tools and mixer under `seed`."""
    speech = {"tts": copilot.EspeakTTS()} if any(s["tool"] == "tts" for s in scene["text"]) else {}
    return copilot.mix_scene(copilot.parse_scene(scene), copilot.Renderer({"sfx": copilot.ProceduralSFX(), **speech},
                                                                          seed)).audio


def read_system(system_dir: Path, conversations, allow_missing: bool = False) -> tuple[dict, list[str]]:
    """A bench/eval_split.py folder -> ({conversation id: {k: (turn k's audio [2, S], seconds), "caption": scene or
    None}}, problems), each file checked (48 kHz audio; JSON with "seconds" and a "plan" or "scene", null or a scene).
    A bad file is an error naming every one, unless allow_missing: its turn is left out."""
    def read(path: Path):
        if not path.is_file():
            raise FileNotFoundError(path)
        if path.suffix == ".wav":
            if (rate := sf.info(str(path)).samplerate) != SAMPLE_RATE:
                raise ValueError(f"{rate} Hz audio; sample.py writes {SAMPLE_RATE} Hz")
            return load_audio(path)
        record = json.loads(path.read_text())
        scene = record["scene" if path.name == "caption.json" else "plan"]
        return float(record["seconds"]), scene if scene is None else _scene(copilot.parse_scene(scene))

    outputs, problems = {}, []
    for conv in conversations:
        d, got, n = Path(system_dir) / conv.id, {}, len(conv.turns)
        for name in [f"turn{k}.{ext}" for k in range(n) for ext in ("wav", "json")] + ["caption.json"]:
            try:
                got[name] = read(d / name)
            except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:   # soundfile's are RuntimeErrors
                problems.append(f"{d / name}: " + ("missing" if isinstance(e, FileNotFoundError) else f"{e!r}"))
        outputs[conv.id] = {k: (got[f"turn{k}.wav"], got[f"turn{k}.json"][0]) for k in range(n)
                            if f"turn{k}.wav" in got and f"turn{k}.json" in got}
        outputs[conv.id] |= {"caption": got["caption.json"][1]} if "caption.json" in got else {}
    if problems and not allow_missing:
        raise ValueError(f"{system_dir}: {len(problems)} unusable outputs:\n  " + "\n  ".join(problems) + "\nrerun "
                         "bench/eval_split.py --data DATA --out DIR (it writes what is missing) or pass "
                         "--allow-missing")
    return outputs, problems


def evaluate(conversations, scorer: FrameScorer, embed: Embedder, system_dir: str | Path | None = None,
             collar: float = 1.0, allow_missing: bool = False, render: Callable = regenerate) -> dict:
    """The tables on the reference conversations, with the control rows (ROWS) and, given a bench/eval_split.py folder,
    the System row -> {table: {edit kind, or "all": {row: {"n", metric: raw value}}}, "skipped": the folder's problems}.
    Storytelling: multiFLAM of the turn-0 plan's sounds in the output; editing: ΔmultiFLAM over the sounds the edit
    keeps, editFLAM over the edited ones (E.3's rule each), Y = reference turn k-1; understanding: multiFLAM of the
    caption's sfx sounds in the reference audio, tcpWER of its speech; adherence: plan_adherence of every turn.
    render(scene, seed) -> audio [2, S] makes the Regenerated outputs."""
    system, skipped = read_system(system_dir, conversations, allow_missing) if system_dir else ({}, [])
    got = defaultdict(list)                      # (table, kind or "all", row) -> per-turn records {metric: value}
    pairs = defaultdict(list)                    # (table, row) -> [(reference, output) clip embeddings] for KAD, FAD
    for i, conv in enumerate(conversations):
        other, mine, score = conversations[(i + 1) % len(conversations)], system.get(conv.id, {}), _memo(scorer)
        scenes, refs = [_scene(t.scene) for t in conv.turns], [load_audio(t.audio) for t in conv.turns]
        plan = [flam_caption(s) for s in scenes[0]["text"]]
        for k, turn in enumerate(conv.turns):
            out = {"Topline": refs[k]}
            if k:
                out |= {"Unchanged": refs[k - 1], "Regenerated": render(scenes[k], f"regenerated|{conv.id}|{k}")}
            out |= {"Shuffled": load_audio(other.turns[min(k, len(other.turns) - 1)].audio),
                    "Silence": torch.zeros_like(refs[k])} | ({"System": mine[k][0]} if k in mine else {})
            table, e_ref = "editing" if k else "storytelling", embed(refs[k])
            for row, y in out.items():
                pairs[table, row] += [(e_ref, embed(y))] if row != "Topline" else []
                if k:
                    d, e = edit_scores(score, scenes[k - 1], scenes[k], refs[k - 1], y)
                    for kind in ("all", turn.kind):
                        got[table, kind, row].append({"delta_multiflam": d, "editflam": e})
                else:
                    got[table, "all", row].append({"multiflam": multiflam(score, plan, y),
                                                   "latency": mine[0][1] if row == "System" else None})
                for m in plan_adherence(y, turn.scene) if row in ("Topline", "Shuffled", "System") else []:
                    got["adherence", "all", row].append({q: abs(v) if isinstance(v, float) else v for q, v in m.items()
                                                         if q != "id"})
        captions = {"Topline": scenes[0], "Shuffled": _scene(other.turns[0].scene), "Silence": {"text": []}}
        captions |= {"System": mine["caption"] or {"text": []}} if "caption" in mine else {}
        for row, caption in captions.items():
            said = [s["text"] for s in caption["text"] if s["tool"] == "sfx"]
            e = tcpwer(_speech(scenes[0]), _speech(caption), collar)
            got["understanding", "all", row].append({"multiflam": multiflam(score, said, refs[0]) if said else 0.0,
                                                     "errors": e.errors, "words": e.length})
    results = {"skipped": skipped} | {t: {"all": {}} for t in ("storytelling", "editing", "understanding", "adherence")}
    for (table, kind, row), records in got.items():
        summary = {"n": len(records)} | {m: _mean(r[m] for r in records) for m in records[0]}
        if table == "understanding":                   # tcpWER: errors over reference words, summed over turns
            summary["tcpwer"] = summary["errors"] / summary["words"] if summary["words"] else None
        if kind == "all" and len(p := pairs[table, row]) > 1:
            x, y = (torch.stack(e) for e in zip(*p))
            summary |= {"kad": kad(x, y), "fad": fad(x, y)}
        results.setdefault(table, {}).setdefault(kind, {})[row] = summary
    return results


def format_tables(results: dict) -> str:
    """The paper's tables with the control rows: Table 2 (storytelling), Table 1 and Fig. 5 (editing, per kind),
    Table 3 (understanding), then plan adherence; FLAM metrics and tcpWER x100 as the paper prints them."""
    def table(title, columns, rows, scales):        # rows: {name: {"n", metric: value}}; scales: {metric: factor}
        cell = lambda v, s: f"{'-':>12}" if v is None else f"{v * s:>12.2f}"
        return "\n".join([f"{title:<30}{'n':>6}" + "".join(f"{c:>12}" for c in columns)] + [f"  {name:<28}{v['n']:>6}"
                          + "".join(cell(v.get(m), s) for m, s in scales.items()) for name, v in rows.items()])

    st, ed, un, ad = (results[t]["all"] for t in ("storytelling", "editing", "understanding", "adherence"))
    out = [table("Table 2: storytelling", ["KAD↓", "multiFLAM↑", "latency s↓"], st,
                 {"kad": 1, "multiflam": 100, "latency": 1}),
           table("Table 1: editing", ["KAD↓", "FAD↓", "ΔmultiFLAM↓", "editFLAM↑"], ed,
                 {"kad": 1, "fad": 1, "delta_multiflam": 100, "editflam": 100})]
    out += [table(f"Fig. 5: {name} per kind", list(ed), {k: {"n": results["editing"][k]["Topline"]["n"]} | {
        r: v[metric] for r, v in results["editing"][k].items()} for k in sorted(results["editing"]) if k != "all"},
        dict.fromkeys(ed, 100))
        for metric, name in (("editflam", "editFLAM↑"), ("delta_multiflam", "ΔmultiFLAM↓"))]
    out += [table("Table 3: understanding", ["tcpWER↓", "multiFLAM↑"], un, {"tcpwer": 100, "multiflam": 100}),
            table("Plan adherence, mean |error|", ["heard %", "onset s", "ILD dB", "level LU"], ad,
                  {"heard": 100, "onset": 1, "ild": 1, "level": 1}),
            "Rows\n" + "\n".join(f"  {r + ':':<13}{w}" for r, w in ROWS.items())]
    if skipped := results["skipped"]:
        out.append(f"System: {len(skipped)} outputs skipped (--allow-missing):\n  " + "\n  ".join(skipped))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="StoryGen-Eval style tables (paper Tables 1-3) with control rows, on the "
                                            "copilot eval split; the layout of --system is in this file's docstring.")
    p.add_argument("--data", type=Path, required=True, help="dataset root of `copilot.py --out DIR`; DIR/eval is read")
    p.add_argument("--system", type=Path, help="outputs of bench/eval_split.py; without it, the control rows only")
    p.add_argument("--allow-missing", action="store_true", help="score what is usable in --system, count the rest")
    p.add_argument("--flam", type=Path, default=Path("checkpoints/toy/flam.pt"), help="SmallFLAM checkpoint to use")
    p.add_argument("--openflam", type=Path, help="folder of OpenFLAM's open_flam_oct17.pth: score as the paper does")
    p.add_argument("--collar", type=float, default=1.0, help="tcpWER collar in seconds (paper: 1)")
    p.add_argument("--device", default="cpu", help="torch device of the scorer")
    p.add_argument("--json", type=Path, help="also write the raw results (unscaled) to this file")
    args = p.parse_args(argv)
    flam = OpenFLAMScorer(args.openflam, args.device) if args.openflam else load_model(SmallFLAM, args.flam,
                                                                                      args.device)
    results = evaluate(copilot.read_conversations(args.data, "eval"), flam if args.openflam else flam.score,
                       flam.clip_embedding, args.system, args.collar, args.allow_missing)
    print(format_tables(results))
    if args.json:                                # atomic, as every file this project writes
        write_atomic(args.json, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    return results


if __name__ == "__main__":
    main()
