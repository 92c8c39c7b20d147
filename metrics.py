"""Evaluation of audio stories: multiFLAM, ΔmultiFLAM, editFLAM, KAD/FAD, tcpWER and the StoryGen-Eval tables.

Implements paper section 3.3 (Eqs. 4-6) and appendix E.1-E.3, on top of a frame-level audio-text
scorer (FLAM, Wu et al. 2025): `OpenFLAMScorer` wraps the `openflam` package when it is installed
with local weights (the paper's scorer), and `SmallFLAM` is a small FLAM trained here on copilot
scenes, whose per-sound activity is known frame by frame (`python train.py --preset toy` trains it).

Scale: every function returns raw values (probabilities in [0, 1], WER as a fraction); the paper's
tables, and `format_tables`, print multiFLAM, ΔmultiFLAM, editFLAM and tcpWER x100. KAD is x100
already (kadtk's convention), FAD is printed as is.

Evaluation: `python metrics.py --data DIR --system OUT` reads the copilot eval split (DIR/eval) and a
directory of system outputs written by bench/eval_split.py in this layout (k counts the turns of a conversation
from 0, as in the dataset):
    OUT/<conversation id>/turn<k>.wav    48 kHz audio. k = 0: the story told from turn 0's instruction.
                                         k >= 1: the edit asked by turn k, given the REFERENCE conversation
                                         up to turn k-1 (its instructions, plans and rendered audio).
    OUT/<conversation id>/turn<k>.json   {"seconds": wall-clock seconds to produce turn<k>.wav,
                                          "plan": the scene JSON object the model wrote}
    OUT/<conversation id>/caption.json   {"seconds": ..., "scene": the scene JSON object the model wrote
                                          when asked to describe the reference turn-0 audio}
                                         A scene is null where the model wrote none that copilot.parse_scene
                                         and validate_scene accept.
What each table measures (the reference plans supply the captions, so systems without a plan compare):
    storytelling   KAD of system vs reference turn-0 audio, multiFLAM of the reference plan's sounds in
                   the system audio, mean latency of turn 0
    editing        per kind (open, add, remove, change, volume, pan): ΔmultiFLAM over the sounds the edit
                   must keep, editFLAM over the edited ones (E.3's rule per sound), Y = reference turn k-1
    understanding  multiFLAM of the caption's sfx sounds in the reference audio, tcpWER (collar 1 s) of its
                   speech sounds against the reference plan's
The ground-truth row scores the copilot's rendered audio (and reference plan) itself: the topline.
Speech sounds are scored by FLAM as "a man/woman speaking" (a transcript is not a sound description).

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

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import SAMPLE_RATE, load_audio, load_model, mel_filterbank

# (audio [2, S] at 48 kHz, captions) -> probabilities [n_captions, n_frames], frames tiling the clip evenly
FrameScorer = Callable[[torch.Tensor, list[str]], torch.Tensor]
Embedder = Callable[[torch.Tensor], torch.Tensor]    # audio [2, S] -> clip embedding [D]


# -----------------------------------------------------------------------------
# The FLAM metrics (appendix E.1-E.3). y is the input audio, y_hat the edited output.

def p_flam(scorer: FrameScorer, caption: str, y: torch.Tensor) -> float:
    """Eq. 13: probability that `caption` occurs in audio y [2, S]: the max of its frame probabilities."""
    return _p_flam_all(scorer, [caption], y)[0]


def _p_flam_all(scorer: FrameScorer, captions: list[str], y: torch.Tensor) -> list[float]:
    probs = scorer(y, list(captions))
    if probs.dim() != 2 or probs.shape[0] != len(captions):
        raise ValueError(f"a FrameScorer must return [n_captions={len(captions)}, n_frames], got {tuple(probs.shape)}")
    return probs.amax(dim=1).tolist()


def multiflam(scorer: FrameScorer, captions: list[str], y: torch.Tensor) -> float:
    """Eq. 4: the mean over the plan's captions X_m of P_FLAM(X_m, y)."""
    if not captions:
        raise ValueError("multiFLAM needs at least one caption; skip scenes without sounds")
    p = _p_flam_all(scorer, captions, y)
    return sum(p) / len(p)


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
    if sound["tool"] == "tts":
        return {"male": "a man speaking", "female": "a woman speaking"}.get(sound.get("gender"), "a person speaking")
    return sound["text"]


def edit_scores(scorer: FrameScorer, before: dict, after: dict, y: torch.Tensor,
                y_hat: torch.Tensor) -> tuple[float | None, float | None]:
    """(ΔmultiFLAM, editFLAM) of one edit turn; None where the turn has no kept or no edited sound.

    The edited sounds are the ids the new plan lists in added/removed/changed. editFLAM is the mean over
    them of: add (Eq. 15) for added ids, remove (Eq. 16) for removed ids, change (Eq. 17) for changed ids
    whose caption changed, acoustic (Eq. 18) for changed ids whose caption stayed (volume, pan, timing).
    An open-ended edit mixes these. ΔmultiFLAM uses every sound of the input plan that was not edited.
    """
    old = {s["id"]: s for s in before["text"]}
    new = {s["id"]: s for s in after["text"]}
    edited = set(after["added"]) | set(after["removed"]) | set(after["changed"])
    terms = [editflam_add(scorer, flam_caption(new[i]), y, y_hat) for i in after["added"]]
    terms += [editflam_remove(scorer, flam_caption(old[i]), y, y_hat) for i in after["removed"]]
    for i in after["changed"]:
        a, b = flam_caption(old[i]), flam_caption(new[i])
        terms.append(editflam_change(scorer, a, b, y, y_hat) if a != b else editflam_acoustic(scorer, a, y, y_hat))
    kept = [flam_caption(s) for i, s in old.items() if i not in edited]
    delta = delta_multiflam(scorer, kept, y, y_hat) if kept else None
    return delta, (sum(terms) / len(terms) if terms else None)


# -----------------------------------------------------------------------------
# OpenFLAM, the paper's scorer (optional; non-commercial licence, pins old torch/transformers)

class OpenFLAMScorer:
    """FrameScorer over `openflam` (Wu et al. 2025) with local weights: `OpenFLAMScorer(DIR)(audio, captions)`.

    OpenFLAM takes mono 48 kHz in exactly 10 s windows and returns 32 frames per window (its time axis is
    interpolated, so shorter input would be stretched): downmix, zero-pad to whole windows, score every
    window with the unbiased frame map, concatenate, and drop the frames that start in the padding.
    Its text encoder (roberta-base) is read from the Hugging Face cache.
    """
    WINDOW = 10 * SAMPLE_RATE      # samples per window
    FRAMES = 32                    # frames per window: 0.3125 s each

    def __init__(self, ckpt_dir: str | Path, device: str = "cpu"):
        try:
            import openflam
        except ImportError as e:
            raise ImportError("OpenFLAMScorer needs the `openflam` package: `pip install openflam` (its pinned torch "
                              "and transformers call for a separate virtual environment), or use SmallFLAM") from e
        ckpt = Path(ckpt_dir) / "open_flam_oct17.pth"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{ckpt}: OpenFLAM weights not found; download open_flam_oct17.pth from "
                                    f"https://huggingface.co/kechenadobe/OpenFLAM into {ckpt_dir}")
        self.device = device
        self.model = openflam.OpenFLAM(model_name="v1-base", default_ckpt_path=str(ckpt_dir)).to(device).eval()

    def _windows(self, audio: torch.Tensor) -> tuple[torch.Tensor, int]:
        x = audio.mean(0)                                      # [S] mono
        n = math.ceil(x.shape[-1] / self.WINDOW)
        x = F.pad(x, (0, n * self.WINDOW - x.shape[-1])).view(n, self.WINDOW)
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
    logit_bias_init: float = field(default=-4.0, metadata={
        "help": "beta(t) at init; negative since most (frame, caption) pairs are negatives"})

    @property
    def hop_samples(self) -> int:  # samples per output frame
        return self.mel_hop * self.pool


FLAM_PRESETS = {
    "toy": FLAMConfig(width=64, audio_layers=3, text_layers=1, embed_dim=64),
    "audiochat": FLAMConfig(width=512, audio_layers=8, text_layers=4, text_heads=8, embed_dim=512),
}


class SmallFLAM(nn.Module):
    """Log-mel conv encoder (frames at 10 Hz) + byte transformer text encoder, scored as FLAM does:
    p = sigmoid(alpha(t) cos(a, t) + beta(t)) with per-text learned scale and bias, trained with a
    frame-wise binary cross-entropy; at inference the unbiased frame map s = p / (p + sigmoid(beta(t))),
    which removes the caption's prior: s >= 0.5 exactly where cos(a, t) >= 0."""
    kind, config_class = "flam", FLAMConfig          # what tokenizer.load_model reads from a flam.pt

    def __init__(self, config: FLAMConfig):
        super().__init__()
        c = self.config = config
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)
        fb = mel_filterbank(c.n_fft, c.n_mels, SAMPLE_RATE, c.f_min, c.f_max)
        self.register_buffer("mel_fb", fb, persistent=False)
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
        x = audio.mean(1)
        n = math.ceil(x.shape[-1] / self.config.hop_samples) * self.config.hop_samples
        x = F.pad(x, (0, n - x.shape[-1]))
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
        L = self.config.max_text_len
        data = [c.encode("utf-8")[:L] for c in captions]
        if not all(data):
            raise ValueError(f"SmallFLAM got an empty caption in {captions!r}; give every sound a description")
        ids = torch.full((len(data), max(map(len, data))), 256, dtype=torch.long)
        for i, b in enumerate(data):
            ids[i, :len(b)] = torch.tensor(list(b))
        ids = ids.to(self.pos_emb.weight.device)
        pad = ids == 256
        h = self.byte_emb(ids) + self.pos_emb.weight[: ids.shape[1]]
        h = self.text_encoder(h, src_key_padding_mask=pad)
        h = (h * ~pad[..., None]).sum(1) / (~pad).sum(1, keepdim=True)  # mean over the caption's bytes
        return self.text_out(h), self.text_scale(h).exp().squeeze(-1), self.text_bias(h).squeeze(-1)

    def logits(self, audio: torch.Tensor, captions: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, 2, S], K captions per clip -> (logits alpha cos + beta [B, K, F], beta [B, K])."""
        B, K = len(captions), len(captions[0])
        if any(len(cs) != K for cs in captions):
            raise ValueError(f"every clip needs the same number of captions, got {[len(cs) for cs in captions]}")
        a = F.normalize(self.embed_audio(audio), dim=-1)                        # [B, F, D]
        t, alpha, beta = self.embed_text([c for cs in captions for c in cs])
        t = F.normalize(t, dim=-1).view(B, K, -1)
        cos = torch.einsum("bkd,bfd->bkf", t, a)
        return alpha.view(B, K, 1) * cos + beta.view(B, K, 1), beta.view(B, K)

    def loss(self, audio: torch.Tensor, captions: list[list[str]], targets: torch.Tensor) -> torch.Tensor:
        """FLAM's frame-wise sigmoid loss: BCE over every (clip, caption, frame); targets [B, K, F] in [0, 1]."""
        logits, _ = self.logits(audio, captions)
        if targets.shape != logits.shape:
            raise ValueError(f"targets {tuple(targets.shape)} do not match the logits {tuple(logits.shape)} [B, K, F]")
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits))

    @torch.no_grad()
    def score(self, audio: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """FrameScorer: audio [2, S] -> unbiased frame probabilities [N, F], s = p / (p + sigmoid(beta))."""
        if audio.dim() != 2 or audio.shape[0] != 2:
            raise ValueError(f"SmallFLAM.score expects audio [2, samples], got {tuple(audio.shape)}")
        logits, beta = self.logits(audio[None].to(self.window.device), [list(captions)])
        p = logits[0].sigmoid()
        return (p / (p + beta[0, :, None].sigmoid())).cpu()

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


def _audio(a: Path | torch.Tensor) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else load_audio(a)


def frame_targets(intervals: list[tuple[float, float]], num_frames: int, frame_s: float) -> torch.Tensor:
    """[num_frames] fraction of each frame [f frame_s, (f + 1) frame_s) covered by the union of intervals."""
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    start = torch.arange(num_frames, dtype=torch.float64) * frame_s
    covered = torch.zeros(num_frames, dtype=torch.float64)
    for s, e in merged:
        covered += (torch.clamp(start + frame_s, max=e) - torch.clamp(start, min=s)).clamp(min=0)
    return (covered / frame_s).float()


def flam_clips(conversations) -> list[LabelledClip]:
    """Every turn of copilot conversations as a LabelledClip: each sound's FLAM caption and activity."""
    clips = []
    for conv in conversations:
        for turn in conv.turns:
            events = defaultdict(list)
            for sound in _scene(turn.scene)["text"]:
                events[flam_caption(sound)] += [tuple(iv) for iv in turn.activity.get(sound["id"], [])]
            clips.append(LabelledClip(Path(turn.audio), dict(events)))
    return clips


def flam_batch(clips: list[LabelledClip], pool: list[str], k: int, rng: random.Random,
               hop_samples: int = 4800) -> tuple[torch.Tensor, list[list[str]], torch.Tensor]:
    """Training batch: audio [B, 2, S] (zero-padded), k captions per clip, targets [B, k, F].

    The captions of a clip are its own sounds (at most k, sampled) and negatives drawn from the pool
    of all training captions that are absent from the clip; padded frames are silent negatives.
    hop_samples is the model's samples per frame (FLAMConfig.hop_samples).
    """
    audio = [_audio(c.audio) for c in clips]
    S = max(a.shape[-1] for a in audio)
    num_frames = math.ceil(S / hop_samples)
    captions, targets = [], []
    for clip in clips:
        pos = list(clip.events)
        pos = rng.sample(pos, k) if len(pos) > k else pos
        absent = [c for c in pool if c not in clip.events]
        if len(absent) < k - len(pos):
            raise ValueError(f"caption pool has {len(absent)} negatives for a clip, need {k - len(pos)}; lower k")
        caps = pos + rng.sample(absent, k - len(pos))
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
    """Frame-level detection on held-out clips: every pool caption scored on every frame of every clip.

    A frame is positive when a caption's intervals cover at least half of it. F1 thresholds the scores.
    """
    pool = pool or sorted({c for clip in clips for c in clip.events})
    scores, labels = [], []
    for clip in clips:
        audio = _audio(clip.audio)
        probs = scorer(audio, pool)                                   # [N, F]
        frame_s = audio.shape[-1] / SAMPLE_RATE / probs.shape[1]
        scores.append(probs.flatten())
        labels.append(torch.cat([frame_targets(clip.events.get(c, []), probs.shape[1], frame_s) >= 0.5 for c in pool]))
    s, y = torch.cat(scores), torch.cat(labels)
    tp, fp, fn = int(((s >= threshold) & y).sum()), int(((s >= threshold) & ~y).sum()), int(((s < threshold) & y).sum())
    return {"auroc": auroc(s, y), "f1": 2 * tp / max(2 * tp + fp + fn, 1)}


# -----------------------------------------------------------------------------
# KAD and FAD over clip embeddings

def kad(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Kernel Audio Distance (Chung et al. 2025): unbiased MMD^2 of reference x [m, D] and evaluated y [n, D].

    Gaussian kernel exp(-|a - b|^2 / (2 h^2)), h = median pairwise distance of the reference set, x100 as
    kadtk. Unbiased, so it is 0 in expectation for equal distributions, O(1/m) apart from 0 for x = y.
    """
    x, y = x.double(), y.double()
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"KAD needs at least 2 embeddings per set, got {m} and {n}")
    h = bandwidth or float(torch.pdist(x).median())
    kxx, kyy, kxy = (torch.exp(-torch.cdist(a, b).pow(2) / (2 * h * h)) for a, b in ((x, x), (y, y), (x, y)))
    mmd = ((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1))
           - 2 * kxy.mean())
    return 100 * float(mmd)


def fad(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance of Gaussians fitted to x [m, D] and y [n, D]: |mu_x - mu_y|^2 + Tr(Sx + Sy - 2 (Sx Sy)^1/2).

    Tr (Sx Sy)^1/2 = sum of sqrt eigenvalues of Sx^1/2 Sy Sx^1/2 (symmetric PSD), so no scipy is needed.
    """
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

    @property
    def rate(self) -> float:
        return self.errors / self.length if self.length else float("nan")


def _word_streams(segments: list[Segment], collar: float | None) -> dict[str, list]:
    """Speaker -> [(word, (start, end))] in segment order, timed as meeteval's defaults: a segment is split in
    proportion to word lengths in characters (reference); a hypothesis word is the centre of its share,
    widened by the collar on each side."""
    streams = defaultdict(list)
    for spk, start, end, text in sorted(segments, key=lambda s: s[1]):
        words = text.split()
        char_s = (end - start) / max(sum(map(len, words)), 1)
        offset = 0
        for w in words:
            a, b = start + char_s * offset, start + char_s * (offset + len(w))
            offset += len(w)
            if collar is not None:
                a = b = (a + b) / 2
                a, b = a - collar, b + collar
            streams[spk].append((w, (a, b)))
    return streams


def _tc_levenshtein(ref: list, hyp: list) -> int:
    """Edit distance where two words may be matched or substituted only if their time intervals overlap."""
    row = list(range(len(hyp) + 1))
    for r_word, (r0, r1) in ref:
        diag, row[0] = row[0], row[0] + 1
        for j, (h_word, (h0, h1)) in enumerate(hyp, 1):
            best = min(row[j] + 1, row[j - 1] + 1)
            if r0 < h1 and r1 > h0:
                best = min(best, diag + (r_word != h_word))
            diag, row[j] = row[j], best
    return row[-1]


def tcpwer(ref: list[Segment], hyp: list[Segment], collar: float = 1.0) -> WordErrors:
    """tcpWER counts: the minimum over speaker assignments of time-constrained word errors (paper: 1 s collar)."""
    r, h = _word_streams(ref, None), _word_streams(hyp, collar)
    rs, hs = list(r), list(h)
    n = max(len(rs), len(hs))
    if n > 8:
        raise ValueError(f"tcpwer tries every speaker assignment; {n} speakers is too many (at most 8)")
    cost = [[_tc_levenshtein(r[rs[i]] if i < len(rs) else [], h[hs[j]] if j < len(hs) else []) for j in range(n)]
            for i in range(n)]   # an unmatched speaker costs all its words (deletions or insertions)
    errors = min((sum(cost[i][p[i]] for i in range(n)) for p in permutations(range(n))), default=0)
    return WordErrors(errors, sum(map(len, r.values())))


# -----------------------------------------------------------------------------
# StoryGen-Eval style evaluation

ROWS = ("Ground truth", "System")


def _scene(scene) -> dict:
    """A copilot Scene (or the paper's JSON as a dict) -> the paper's JSON dict."""
    if isinstance(scene, dict):
        return scene
    import copilot
    return json.loads(copilot.scene_to_json(scene))


def _speech(scene: dict | None) -> list[Segment]:
    """The speech sounds of a scene as tcpWER segments; case and punctuation do not count."""
    return [(s.get("speaker", "?"), s["start_time"], s["start_time"] + s["duration"],
             re.sub(r"[^\w' ]+", " ", s["text"].lower()))
            for s in (scene or {"text": []})["text"] if s["tool"] == "tts"]


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing system output; produce it with bench/eval_split.py (layout: "
                                f"metrics.py's docstring)")
    return path


def _read_json(path: Path) -> dict:
    return json.loads(_need(path).read_text())


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def evaluate(conversations, system_dir: str | Path, scorer: FrameScorer, embed: Embedder, collar: float = 1.0) -> dict:
    """Score a system's outputs on reference conversations; returns {table: {row: {metric: value}}}."""
    system_dir = Path(system_dir)
    story, und = defaultdict(list), defaultdict(list)
    edits = defaultdict(lambda: defaultdict(list))           # kind -> row -> [(delta, edit)]
    wer, latency, emb = defaultdict(lambda: [0, 0]), [], defaultdict(list)
    for conv in conversations:
        out = system_dir / conv.id
        scenes = [_scene(t.scene) for t in conv.turns]
        refs = [load_audio(t.audio) for t in conv.turns]
        hyps = [load_audio(_need(out / f"turn{k}.wav")) for k in range(len(conv.turns))]
        caption = _read_json(out / "caption.json").get("scene")
        # Score every audio once against every caption this conversation needs, then look rows up.
        needed = sorted({flam_caption(s) for sc in scenes + [caption or {"text": []}] for s in sc["text"]})
        table = {id(a): dict(zip(needed, scorer(a, needed))) for a in refs + hyps}

        def cached(a, caps):
            return torch.stack([table[id(a)][c] for c in caps])
        plan = [flam_caption(s) for s in scenes[0]["text"]]
        for row, audio in zip(ROWS, (refs[0], hyps[0])):
            story[row].append(multiflam(cached, plan, audio) if plan else None)
        latency.append(float(_read_json(out / "turn0.json")["seconds"]))
        emb["story"].append((embed(refs[0]), embed(hyps[0])))
        for k in range(1, len(conv.turns)):
            for row, y_hat in zip(ROWS, (refs[k], hyps[k])):
                edits[conv.turns[k].kind][row].append(edit_scores(cached, scenes[k - 1], scenes[k], refs[k - 1], y_hat))
            emb["edit"].append((embed(refs[k]), embed(hyps[k])))
        sfx = [s["text"] for s in scenes[0]["text"] if s["tool"] == "sfx"]
        for row, scene in zip(ROWS, (scenes[0], caption)):
            said = [s["text"] for s in (scene or {"text": []})["text"] if s["tool"] == "sfx"]
            und[row].append((multiflam(cached, said, refs[0]) if said else 0.0) if sfx else None)
            e = tcpwer(_speech(scenes[0]), _speech(scene), collar)
            wer[row][0] += e.errors
            wer[row][1] += e.length

    def distances(pairs):
        if len(pairs) < 2:
            return {"kad": None, "fad": None}
        ref, hyp = (torch.stack(p) for p in zip(*pairs))
        return {"kad": kad(ref, hyp), "fad": fad(ref, hyp)}

    editing = {row: {} for row in ROWS}
    for kind in ["all"] + sorted(edits):
        for row in ROWS:
            pairs = [p for k in edits for p in edits[k][row]] if kind == "all" else edits[kind][row]
            editing[row][kind] = {"n": len(pairs), "delta_multiflam": _mean(d for d, _ in pairs),
                                  "editflam": _mean(e for _, e in pairs)}
    editing["System"]["all"].update(distances(emb["edit"]))
    return {
        "storytelling": {"n": len(story["System"]), "Ground truth": {"multiflam": _mean(story["Ground truth"])},
                         "System": {**distances(emb["story"]), "multiflam": _mean(story["System"]),
                                    "latency": _mean(latency)}},
        "editing": editing,
        "understanding": {row: {"tcpwer": wer[row][0] / wer[row][1] if wer[row][1] else None,
                                "multiflam": _mean(und[row])} for row in ROWS},
    }


def format_tables(results: dict) -> str:
    """The paper's tables (Tables 1-3 and Fig. 5's per-kind split), FLAM metrics and tcpWER x100."""
    def cell(v, scale=1.0):
        return f"{v * scale:>14.2f}" if v is not None else f"{'-':>14}"

    def table(title, columns, rows):
        lines = [f"{title:<24}" + "".join(f"{c:>14}" for c in columns)]
        return "\n".join(lines + [f"  {name:<22}" + "".join(cells) for name, cells in rows])

    st, ed, un = results["storytelling"], results["editing"], results["understanding"]
    out = [table(f"Storytelling (n={st['n']})", ["KAD↓", "multiFLAM↑", "latency s↓"],
                 [(r, [cell(st[r].get("kad")), cell(st[r]["multiflam"], 100), cell(st[r].get("latency"))])
                  for r in ROWS])]
    out.append(table(f"Editing (n={ed['System']['all']['n']})", ["KAD↓", "FAD↓", "ΔmultiFLAM↓", "editFLAM↑"],
                     [(r, [cell(ed[r]["all"].get("kad")), cell(ed[r]["all"].get("fad")),
                           cell(ed[r]["all"]["delta_multiflam"], 100), cell(ed[r]["all"]["editflam"], 100)])
                      for r in ROWS]))
    metrics = ("delta_multiflam", "editflam")
    out.append(table("Editing per kind", ["n", "GT ΔmFLAM", "Sys ΔmFLAM", "GT editFLAM", "Sys editFLAM"],
                     [(k, [f"{ed['System'][k]['n']:>14}"] + [cell(ed[r][k][m], 100) for m in metrics for r in ROWS])
                      for k in ed["System"] if k != "all"]))
    out.append(table("Understanding", ["tcpWER↓", "multiFLAM↑"],
                     [(r, [cell(un[r]["tcpwer"], 100), cell(un[r]["multiflam"], 100)]) for r in ROWS]))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="StoryGen-Eval style tables (paper Tables 1-3) for a system's outputs "
                                            "on the copilot eval split; the output layout is in this file's docstring.")
    p.add_argument("--data", type=Path, required=True,
                   help="dataset root written by `python copilot.py --out DIR`; DIR/eval is read")
    p.add_argument("--system", type=Path, required=True, help="directory of system outputs (bench/eval_split.py)")
    p.add_argument("--flam", type=Path, default=Path("checkpoints/toy/flam.pt"),
                   help="SmallFLAM checkpoint: the frame scorer and the KAD/FAD embedding")
    p.add_argument("--openflam", type=Path, default=None,
                   help="directory holding OpenFLAM's open_flam_oct17.pth: score with OpenFLAM, as the paper does")
    p.add_argument("--collar", type=float, default=1.0, help="tcpWER collar in seconds (paper: 1)")
    p.add_argument("--device", default="cpu", help="torch device of the scorer")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results (unscaled) to this file")
    args = p.parse_args(argv)
    import copilot
    conversations = copilot.read_conversations(args.data, "eval")
    if args.openflam is not None:
        scorer = OpenFLAMScorer(args.openflam, args.device)
        embed = scorer.clip_embedding
    else:
        flam = load_model(SmallFLAM, args.flam, args.device)
        scorer, embed = flam.score, flam.clip_embedding
    results = evaluate(conversations, args.system, scorer, embed, args.collar)
    print(format_tables(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
