"""Tests for metrics.py: the FLAM formulas on hand-computed cases, SmallFLAM (shapes, checkpoints, training on a
synthetic sound world), KAD/FAD, tcpWER (hand cases and meeteval), the OpenFLAM adapter and the evaluation tables.

`python tests/test_metrics.py [steps]` trains SmallFLAM on the synthetic world for longer and prints its
held-out detection quality (bench/README.md's figures).
"""
import json
import math
import random
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path

import pytest
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import copilot  # noqa: E402
import metrics  # noqa: E402
from metrics import (FLAM_PRESETS, FLAMConfig, LabelledClip, SmallFLAM, auroc, delta_multiflam,  # noqa: E402
                     detection_quality, edit_scores, editflam_acoustic, editflam_add, editflam_change,
                     editflam_remove, fad, flam_batch, frame_targets, kad, multiflam, p_flam, tcpwer)
from tokenizer import SAMPLE_RATE, CheckpointError, load_model, mel_filterbank, save_audio  # noqa: E402


# -----------------------------------------------------------------------------
# The formulas, on a scorer with hand-made frame probabilities

def table_scorer(table):
    """FrameScorer reading table[tag][caption] (a list of frame probabilities); an audio's tag is its first sample."""
    def scorer(audio, captions):
        return torch.tensor([table[int(audio[0, 0])][c] for c in captions])
    return scorer


Y, Y_HAT = torch.zeros(2, 10), torch.ones(2, 10)       # tags 0 (input) and 1 (edited output)
SCORER = table_scorer({
    0: {"dog": [0.1, 0.9, 0.2], "rain": [0.5, 0.6, 0.4], "bell": [0.0, 0.1, 0.05], "a man speaking": [0.8, 0.7, 0.0]},
    1: {"dog": [0.1, 0.2, 0.3], "rain": [0.7, 0.5, 0.3], "bell": [0.8, 0.2, 0.1], "a man speaking": [0.6, 0.0, 0.0]},
})


def test_flam_formulas_hand_computed():
    assert p_flam(SCORER, "dog", Y) == pytest.approx(0.9)                       # Eq. 13: max over frames
    assert multiflam(SCORER, ["dog", "rain"], Y) == pytest.approx(0.75)         # Eq. 4: (0.9 + 0.6) / 2
    assert multiflam(SCORER, ["dog", "rain"], Y_HAT) == pytest.approx(0.5)      # (0.3 + 0.7) / 2
    assert delta_multiflam(SCORER, ["dog", "rain"], Y, Y_HAT) == pytest.approx(0.25)  # Eq. 14
    assert delta_multiflam(SCORER, ["dog", "rain"], Y_HAT, Y) == pytest.approx(0.25)  # absolute value
    with pytest.raises(ValueError, match="at least one caption"):
        multiflam(SCORER, [], Y)


def test_editflam_sign_conventions():
    # add (Eq. 15): the bell appears (0.1 -> 0.8): +0.7; "adding" the dog that got weaker: negative
    assert editflam_add(SCORER, "bell", Y, Y_HAT) == pytest.approx(0.7)
    assert editflam_add(SCORER, "dog", Y, Y_HAT) == pytest.approx(-0.6)
    # remove (Eq. 16): the dog fades (0.9 -> 0.3): +0.6; "removing" the bell that appeared: negative
    assert editflam_remove(SCORER, "dog", Y, Y_HAT) == pytest.approx(0.6)
    assert editflam_remove(SCORER, "bell", Y, Y_HAT) == pytest.approx(-0.7)
    # change dog -> bell (Eq. 17): (add bell 0.7 + remove dog 0.6) / 2
    assert editflam_change(SCORER, "dog", "bell", Y, Y_HAT) == pytest.approx(0.65)
    # acoustic (Eq. 18): rain kept (0.6 -> 0.7) scores 0.9; the dog lost (0.9 -> 0.3) only 0.4
    assert editflam_acoustic(SCORER, "rain", Y, Y_HAT) == pytest.approx(0.9)
    assert editflam_acoustic(SCORER, "dog", Y, Y_HAT) == pytest.approx(0.4)
    # no edit at all: 0 for semantic edits, 1 for acoustic ones
    for f in (editflam_add, editflam_remove):
        assert f(SCORER, "dog", Y, Y) == 0.0
    assert editflam_change(SCORER, "dog", "bell", Y, Y) == 0.0
    assert editflam_acoustic(SCORER, "dog", Y, Y) == 1.0


def sound(i, text, tool="sfx", **kw):
    s = {"tool": tool, "text": text, "loudness": -20, "panning": 0.0, "start_time": 0.0, "duration": 1.0, "id": i}
    return {**s, **kw}


def scene(sounds, added=(), changed=(), removed=()):
    return {"description": "", "added": list(added), "changed": list(changed), "removed": list(removed), "text": sounds}


BEFORE = scene([sound(1, "dog"), sound(2, "rain"), sound(3, "hi", "tts", gender="male", speaker="Al")])


@pytest.mark.parametrize("after, expected_edit, kept", [
    (scene(BEFORE["text"] + [sound(4, "bell")], added=[4]), 0.7, ["dog", "rain", "a man speaking"]),
    (scene(BEFORE["text"][1:], removed=[1]), 0.6, ["rain", "a man speaking"]),
    (scene([sound(1, "bell")] + BEFORE["text"][1:], changed=[1]), 0.65, ["rain", "a man speaking"]),
    (scene([BEFORE["text"][0], sound(2, "rain", loudness=-12), BEFORE["text"][2]], changed=[2]), 0.9,
     ["dog", "a man speaking"]),
    (scene(BEFORE["text"][1:] + [sound(4, "bell")], added=[4], removed=[1]), 0.65, ["rain", "a man speaking"]),
], ids=["add", "remove", "change", "volume", "open"])
def test_edit_scores_pick_the_rule_and_the_kept_sounds(after, expected_edit, kept):
    delta, edit = edit_scores(SCORER, BEFORE, after, Y, Y_HAT)
    assert edit == pytest.approx(expected_edit)
    assert delta == pytest.approx(delta_multiflam(SCORER, kept, Y, Y_HAT))


def test_frame_targets_union_and_partial_frames():
    got = frame_targets([(0.05, 0.25), (0.2, 0.3)], 4, 0.1)
    assert torch.allclose(got, torch.tensor([0.5, 1.0, 1.0, 0.0])), got
    assert frame_targets([], 3, 0.1).tolist() == [0.0, 0.0, 0.0]


# -----------------------------------------------------------------------------
# AUROC and detection quality

def test_auroc_matches_pair_counting_with_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (60,), generator=g).float()              # many ties
    y = torch.rand(60, generator=g) < 0.4
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean()
    assert auroc(s, y) == pytest.approx(float(brute))
    with pytest.raises(ValueError, match="positives and negatives"):
        auroc(s, torch.ones(60, dtype=torch.bool))


def test_detection_quality_hand_case():
    def scorer(audio, captions):
        rows = {"a": [0.9] * 4 + [0.4] + [0.1] * 5, "b": [0.6] + [0.0] * 9}
        return torch.tensor([rows[c] for c in captions])
    q = detection_quality(scorer, [LabelledClip(torch.zeros(2, SAMPLE_RATE), {"a": [(0.0, 0.5)]})], pool=["a", "b"])
    # positives a0..a4; tp 4 (a0..a3), fn 1 (a4 at 0.4), fp 1 (b0 at 0.6); 74 of 75 pairs ordered right; clip level,
    # "a" (max 0.9) above the absent "b" (max 0.6): 1 of 1
    assert q["f1"] == pytest.approx(0.8) and q["auroc"] == pytest.approx(74 / 75) and q["clip"] == 1.0


# -----------------------------------------------------------------------------
# KAD and FAD

def test_kad_against_the_definition():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64) + 0.5
    d = [(x[i] - x[j]).norm() for i in range(4) for j in range(i + 1, 4)]
    h = sorted(d)[(len(d) - 1) // 2]                                 # lower median, as torch.median

    def k(a, b):
        return math.exp(-float((a - b).pow(2).sum()) / (2 * float(h) ** 2))
    xx = sum(k(x[i], x[j]) for i in range(4) for j in range(4) if i != j) / 12
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(a, b) for a in x for b in y) / 20
    assert kad(x, y) == pytest.approx(100 * (xx + yy - 2 * xy), rel=1e-9)


def test_kad_zero_for_equal_sets_and_grows_with_shift():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    assert -200 / 300 <= kad(x, x) <= 0, kad(x, x)                   # unbiased: O(1/m) below 0 for x = y
    same = kad(x, y)
    assert abs(same) < 0.3, same
    shifted = [kad(x, y + s) for s in (0.25, 0.5, 1.0)]
    assert same < shifted[0] < shifted[1] < shifted[2], (same, shifted)


def test_fad_zero_identical_exact_shift_and_scipy():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    assert abs(fad(x, x)) < 1e-8
    shift = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.1, 0.0], dtype=torch.float64)
    assert fad(x, x + shift) == pytest.approx(float(shift.pow(2).sum()), abs=1e-8)   # same covariance
    scipy_linalg = pytest.importorskip("scipy.linalg")
    y = torch.randn(150, 6, generator=g, dtype=torch.float64) * 2 + 1
    sx, sy = torch.cov(x.T).numpy(), torch.cov(y.T).numpy()
    covmean = scipy_linalg.sqrtm(sx @ sy).real
    want = float((x.mean(0) - y.mean(0)).pow(2).sum()) + float(sx.trace() + sy.trace() - 2 * covmean.trace())
    assert fad(x, y) == pytest.approx(want, rel=1e-6)


# -----------------------------------------------------------------------------
# tcpWER

REF = [("A", 0.0, 2.0, "hello world"), ("B", 2.0, 4.0, "good night")]


@pytest.mark.parametrize("hyp, errors", [
    (REF, 0),                                                                # perfect
    ([("A", 0.0, 2.0, "hello word"), ("B", 2.0, 4.0, "good night")], 1),     # one substitution
    ([("y", 0.0, 2.0, "hello world"), ("x", 2.0, 4.0, "good night")], 0),    # speaker labels swapped
    ([("A", 0.0, 2.0, "hello world"), ("B", 9.0, 10.0, "good night")], 4),   # B outside the collar: 2 del + 2 ins
    ([("A", 0.0, 2.0, "hello world")], 2),                                   # missed speaker: 2 deletions
    (REF + [("C", 5.0, 6.0, "extra words")], 2),                             # false-alarm speaker: 2 insertions
    ([("A", 0.0, 2.0, "hello world good night")], 4),                        # one speaker for two: 2 ins + 2 del
    ([], 4),
])
def test_tcpwer_hand_cases(hyp, errors):
    got = tcpwer(REF, hyp, collar=1.0)
    assert (got.errors, got.length) == (errors, 4), got


def test_tcpwer_collar_decides_matching():
    hyp = [("A", 3.5, 5.5, "hello world")]   # word centres at 4.0 and 5.0 (character-based), ref words in 0-1, 1-2
    assert tcpwer([REF[0]], hyp, collar=1.0).errors == 4
    assert tcpwer([REF[0]], hyp, collar=3.5).errors == 0


def test_tcpwer_matches_meeteval_on_random_cases():
    pytest.importorskip("meeteval")
    from meeteval.io import SegLST
    from meeteval.wer.wer.time_constrained import time_constrained_minimum_permutation_word_error_rate as ref_tcp
    rng = random.Random(0)
    vocab = ["a", "bee", "sea", "dog", "barks", "loud", "rain", "falls", "on", "tin", "roof"]

    def segments(n_spk, names):
        out, t = [], 0.0
        for _ in range(rng.randint(1, 5)):
            t += rng.uniform(0.1, 2.0)
            d = rng.uniform(0.3, 3.0)
            out.append((rng.choice(names[:n_spk]), round(t, 3), round(t + d, 3),
                        " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 6)))))
        return out

    def seglst(segs):
        return SegLST([{"session_id": "s", "speaker": s, "start_time": a, "end_time": b, "words": w}
                       for s, a, b, w in segs])

    for case in range(40):
        ref = segments(rng.randint(1, 3), ["A", "B", "C"])
        hyp = [(s, a + rng.uniform(-1.5, 1.5), b + rng.uniform(-1.5, 1.5), w)
               for s, a, b, w in segments(3, ["x", "y", "z"])]
        hyp = [(s, a, max(a, b), w) for s, a, b, w in hyp] + \
            ([(s.lower(), a, b, w) for s, a, b, w in ref] if case % 2 else [])
        collar = [0.0, 0.5, 1.0][case % 3]
        want = ref_tcp(seglst(ref), seglst(hyp), collar=collar)
        got = tcpwer(ref, hyp, collar=collar)
        assert (got.errors, got.length) == (want.errors, want.length), (case, ref, hyp, collar)


# -----------------------------------------------------------------------------
# SmallFLAM

def test_mel_filterbank_covers_every_band_and_a_tone_lands_in_its_band():
    fb = mel_filterbank(2048, 64, SAMPLE_RATE, 50.0, 14_000.0)
    assert fb.shape == (64, 1025) and (fb.sum(1) > 0).all(), fb.sum(1).min()
    model = SmallFLAM(FLAMConfig())
    t = torch.arange(SAMPLE_RATE) / SAMPLE_RATE
    mel = model.log_mel(torch.sin(2 * math.pi * 1000 * t).expand(1, 2, -1))[0].mean(1)   # [n_mels]
    centre = torch.linspace(2595 * math.log10(1 + 50 / 700), 2595 * math.log10(1 + 14_000 / 700), 66)[1:-1]
    want = int((700 * (10 ** (centre / 2595) - 1) - 1000).abs().argmin())
    assert abs(int(mel.argmax()) - want) <= 1, (int(mel.argmax()), want)


def test_small_flam_shapes_and_probabilities():
    model = SmallFLAM(FLAM_PRESETS["toy"])
    audio = torch.randn(2, 98_400) * 0.1                              # 2.05 s -> ceil(98400 / 4800) = 21 frames
    s = model.score(audio, ["a dog barks", "rain on a tin roof", "ü"])
    assert s.shape == (3, 21) and ((s > 0) & (s < 1)).all()
    assert model.clip_embedding(audio).shape == (FLAM_PRESETS["toy"].embed_dim,)
    with pytest.raises(ValueError, match="empty caption"):
        model.score(audio, [""])
    with pytest.raises(ValueError, match=r"\[2, samples\]"):
        model.score(audio[0], ["x"])


def test_small_flam_checkpoint_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    model = SmallFLAM(FLAM_PRESETS["toy"]).eval()     # load_model returns an eval-mode model; train mode
    path = tmp_path / "flam.pt"                        # takes another attention path (differs by ~1e-7)
    torch.save({"kind": "flam", "config": asdict(model.config), "model": model.state_dict()}, path)
    audio = torch.randn(2, 24_000)
    assert torch.equal(load_model(SmallFLAM, path).score(audio, ["a bell"]), model.score(audio, ["a bell"]))
    with pytest.raises(CheckpointError, match="train.py"):
        load_model(SmallFLAM, tmp_path / "nope.pt")
    torch.save({"kind": "vae", "config": {}, "model": {}}, tmp_path / "vae.pt")
    with pytest.raises(ValueError, match="expected a 'flam' checkpoint, found 'vae'"):
        load_model(SmallFLAM, tmp_path / "vae.pt")
    torch.save({"kind": "flam", "config": {**asdict(model.config), "width": 32}, "model": model.state_dict()}, path)
    with pytest.raises(ValueError, match="do not match"):
        load_model(SmallFLAM, path)


# A synthetic sound world: five sound types with distinct spectra or rhythms, mixed at random times.
SOUND_TYPES = {
    "a high beep": lambda t, g: torch.sin(2 * math.pi * 3000 * t),
    "a low hum": lambda t, g: torch.sin(2 * math.pi * 120 * t) + 0.5 * torch.sin(2 * math.pi * 240 * t),
    "white noise hiss": lambda t, g: torch.randn(t.shape, generator=g) * 0.5,
    "a ticking clock": lambda t, g: ((t * 8) % 1 < 0.01).float() * 3,
    "a rising chirp": lambda t, g: torch.sin(2 * math.pi * (400 * t + 600 * t * t)),
}


def synth_clip(g: torch.Generator, seconds: float = 2.0) -> LabelledClip:
    S = int(seconds * SAMPLE_RATE)
    audio, events = torch.zeros(2, S), {}
    names = list(SOUND_TYPES)
    for i in torch.randperm(len(names), generator=g)[: int(torch.randint(1, 4, (1,), generator=g))].tolist():
        start = float(torch.rand(1, generator=g)) * (seconds - 0.4)
        end = min(seconds, start + 0.3 + float(torch.rand(1, generator=g)) * 1.0)
        a, b = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
        gain = 10 ** (-(10 + 20 * float(torch.rand(1, generator=g))) / 20)        # -10 .. -30 dB
        pan = float(torch.rand(1, generator=g)) * 2 - 1
        x = SOUND_TYPES[names[i]](torch.arange(b - a) / SAMPLE_RATE, g) * gain
        audio[0, a:b] += x * math.cos((pan + 1) * math.pi / 4)
        audio[1, a:b] += x * math.sin((pan + 1) * math.pi / 4)
        events[names[i]] = [(start, end)]
    return LabelledClip(audio, events)


def train_synthetic(steps: int, seed: int = 0) -> tuple[SmallFLAM, dict]:
    """Train a toy SmallFLAM on batches of 8 synthetic clips; detection quality on 24 held-out clips."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # tiny ops: on a busy 2-core machine a second thread costs up to 20x
    try:
        torch.manual_seed(seed)
        g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
        model = SmallFLAM(FLAM_PRESETS["toy"])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            audio, captions, targets = flam_batch([synth_clip(g) for _ in range(8)], list(SOUND_TYPES), k=4, rng=rng)
            loss = model.loss(audio, captions, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
        held_out = torch.Generator().manual_seed(10_000 + seed)
        quality = detection_quality(model.score, [synth_clip(held_out) for _ in range(24)], pool=list(SOUND_TYPES))
    finally:
        torch.set_num_threads(threads)
    return model, {**quality, "loss": loss.item()}


def test_flam_batch_builds_positives_negatives_and_targets():
    clip = LabelledClip(torch.zeros(2, 48_000), {"a": [(0.0, 0.25)], "b": [(0.5, 1.0)]})
    short = LabelledClip(torch.zeros(2, 24_000), {"c": [(0.0, 0.1)]})
    audio, captions, targets = flam_batch([clip, short], ["a", "b", "c", "d"], k=3, rng=random.Random(0))
    assert audio.shape == (2, 2, 48_000) and targets.shape == (2, 3, 10)
    assert captions[0][:2] == ["a", "b"] and captions[0][2] in ("c", "d")
    assert captions[1][0] == "c" and set(captions[1][1:]) <= {"a", "b", "d"}
    assert targets[0, 0].tolist() == [1.0, 1.0, 0.5] + [0.0] * 7
    assert targets[0, 2].sum() == 0 and targets[1, 0, 0] == 1.0 and targets[1, 0, 5:].sum() == 0  # padding: negative
    audio, captions, targets = flam_batch([clip, short], ["a", "b", "c", "d"], k=16, rng=random.Random(0))
    assert [sorted(c) for c in captions] == [["a", "b", "c", "d"]] * 2 and targets.shape == (2, 4, 10)   # k >= pool


def test_small_flam_learns_to_detect_synthetic_sounds():
    _, q = train_synthetic(steps=150)
    print(f"synthetic detection after 150 steps: AUROC {q['auroc']:.3f}, F1 {q['f1']:.3f}, loss {q['loss']:.3f}")
    assert q["auroc"] > 0.95 and q["f1"] > 0.5, q    # chance: AUROC 0.5, F1 of "always present" 0.22


# -----------------------------------------------------------------------------
# OpenFLAM adapter (its windowing, with a stand-in for the package)

class FakeOpenFLAM:
    def __init__(self, model_name, default_ckpt_path):
        assert model_name == "v1-base" and Path(default_ckpt_path).is_dir()

    def to(self, device):
        return self

    def eval(self):
        return self

    def get_local_similarity(self, x, texts, method, cross_product):
        assert x.shape[1] == 480_000 and method == "unbiased" and cross_product
        e = x.abs().view(x.shape[0], 32, 15_000).mean(-1)            # [W, 32] frame energy
        return torch.stack([e * (i + 1) for i in range(len(texts))], 1)   # [W, N, 32]

    def get_global_audio_features(self, x):
        return x.abs().mean(1, keepdim=True).expand(-1, 512)


def test_openflam_adapter_windows_and_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openflam", None)
    with pytest.raises(ImportError, match="pip install openflam"):
        metrics.OpenFLAMScorer(tmp_path)
    monkeypatch.setitem(sys.modules, "openflam", types.SimpleNamespace(OpenFLAM=FakeOpenFLAM))
    with pytest.raises(FileNotFoundError, match="open_flam_oct17.pth"):
        metrics.OpenFLAMScorer(tmp_path)
    (tmp_path / "open_flam_oct17.pth").write_bytes(b"")
    scorer = metrics.OpenFLAMScorer(tmp_path)
    audio = torch.zeros(2, 600_000)                                   # 12.5 s: two windows, 40 frames kept
    audio[0, 480_000:495_000] = 1.0                                   # left only: mono 0.5 in frame 32
    s = scorer(audio, ["x", "y"])
    assert s.shape == (2, 40)
    assert s[0, 32] == pytest.approx(0.5) and s[1, 32] == pytest.approx(1.0) and s[:, :32].abs().sum() == 0
    assert scorer.clip_embedding(audio).shape == (512,)


# -----------------------------------------------------------------------------
# Evaluation tables and their control rows on a tiny fake eval split, with a right, a constant and a random scorer

TONES = {"a low tone": 300.0, "a middle tone": 1000.0, "a high tone": 3000.0, "a man speaking": 500.0}


def tone_scorer(audio, captions):
    """The right FrameScorer: fraction of each 0.1 s frame's energy at the caption's tone frequency."""
    x = audio.mean(0)
    frames = x[: len(x) // 4800 * 4800].view(-1, 4800)
    t = torch.arange(4800) / SAMPLE_RATE
    rows = []
    for c in captions:
        w = 2 * math.pi * TONES[c] * t
        power = (frames @ torch.cos(w)) ** 2 + (frames @ torch.sin(w)) ** 2
        rows.append((power * 2 / 4800 / (frames.pow(2).sum(1) + 1e-9)).clamp(0, 1))
    return torch.stack(rows)


def constant_scorer(audio, captions):
    return torch.full((len(captions), 20), 0.5)


def random_scorer(audio, captions):
    return torch.rand(len(captions), 20)


def render(sc: dict, seed=None, seconds: float = 2.0) -> torch.Tensor:
    audio = torch.zeros(2, int(seconds * SAMPLE_RATE))
    for s in sc["text"]:
        a, b = int(s["start_time"] * SAMPLE_RATE), int((s["start_time"] + s["duration"]) * SAMPLE_RATE)
        caption = metrics.flam_caption(s)
        audio[:, a:b] += 10 ** (s["loudness"] / 20) * torch.sin(
            2 * math.pi * TONES[caption] * torch.arange(b - a) / SAMPLE_RATE)
    return audio


def fake_eval_split(root: Path) -> list:
    """Two conversations: a low tone and Al's line (add a high tone, remove the low one), a middle tone and Bo's line
    (change the middle tone to a low one, make Bo louder)."""
    low, mid, high = sound(1, "a low tone"), sound(1, "a middle tone"), sound(3, "a high tone", start_time=1.5,
                                                                              duration=0.5)
    al = sound(2, "Hello there, friend.", "tts", gender="male", speaker="Al", start_time=0.5, duration=1.0)
    bo = sound(2, "Good night, my friend.", "tts", gender="male", speaker="Bo", start_time=0.5, duration=1.0)
    plans = {
        "c0": [("story", scene([low, al])), ("add", scene([low, al, high], added=[3])),
               ("remove", scene([al, high], removed=[1]))],
        "c1": [("story", scene([mid, bo])), ("change", scene([low, bo], changed=[1])),
               ("volume", scene([low, {**bo, "loudness": -12}], changed=[2]))],
    }
    conversations = []
    for cid, turns in plans.items():
        conv_turns = []
        for k, (kind, sc) in enumerate(turns):
            path = root / "eval" / cid / f"turn{k}.wav"
            save_audio(path, render(sc))
            conv_turns.append(types.SimpleNamespace(instruction="", kind=kind, scene=sc, audio=path, activity={}))
        conversations.append(types.SimpleNamespace(id=cid, seed_text="", turns=conv_turns))
    return conversations


def copy_system(conversations, out: Path, caption_for: dict) -> None:
    """A system that tells the reference story but never edits: turn k returns the reference turn k-1."""
    for conv in conversations:
        for k, turn in enumerate(conv.turns):
            src = conv.turns[max(k - 1, 0)].audio
            (out / conv.id).mkdir(parents=True, exist_ok=True)
            (out / conv.id / f"turn{k}.wav").write_bytes(Path(src).read_bytes())
            (out / conv.id / f"turn{k}.json").write_text(json.dumps({"seconds": 1.5 + k, "plan": None}))
        (out / conv.id / "caption.json").write_text(json.dumps({"seconds": 0.5, "scene": caption_for[conv.id]}))


def embed(audio):
    return torch.fft.rfft(audio.mean(0)).abs()[::4800][:8]


def run_eval(tmp_path, scorer, system=True, caption_for=None):
    conversations = fake_eval_split(tmp_path / "data")
    if system:
        copy_system(conversations, tmp_path / "out", caption_for or {c.id: c.turns[0].scene for c in conversations})
    return metrics.evaluate(conversations, scorer, embed, tmp_path / "out" if system else None, render=render)


def test_control_rows_with_a_right_scorer(tmp_path):
    wrong = scene([sound(1, "a high tone"), sound(2, "Hello there, fiend!", "tts", gender="male", speaker="Z",
                                                 start_time=0.5, duration=1.0)])
    r = run_eval(tmp_path, tone_scorer, caption_for={"c0": None, "c1": wrong})
    st, ed, un = (r[t]["all"] for t in ("storytelling", "editing", "understanding"))
    # storytelling: the plan's sounds are all in its own audio, half in the other story's (Al and Bo both speak)
    assert [st[row]["n"] for row in st] == [2, 2, 2, 2], st
    assert st["Topline"]["multiflam"] > 0.95 and st["Shuffled"]["multiflam"] == pytest.approx(0.5, abs=0.05), st
    assert st["Silence"]["multiflam"] == 0 and st["System"]["multiflam"] == st["Topline"]["multiflam"], st
    assert st["System"]["latency"] == pytest.approx(1.5) and st["Topline"]["latency"] is None, st
    for kind in ("add", "remove", "change"):   # the edits happen in the topline and the fresh render, not unchanged
        row = r["editing"][kind]
        assert row["Topline"]["editflam"] > 0.9 and row["Regenerated"]["editflam"] > 0.9, (kind, row)
        assert row["Unchanged"]["editflam"] == 0 and row["System"]["editflam"] == 0, (kind, row)
    assert r["editing"]["remove"]["Silence"]["editflam"] > 0.9                  # silence "removes" every sound
    assert r["editing"]["volume"]["Unchanged"]["editflam"] == 1.0               # nothing changed: acoustic rule
    assert ed["Unchanged"]["delta_multiflam"] == 0 and ed["Topline"]["delta_multiflam"] < 0.01, ed
    assert ed["Silence"]["delta_multiflam"] > 0.9 and ed["Shuffled"]["delta_multiflam"] > 0.3, ed
    assert ed["System"]["n"] == ed["Topline"]["n"] == 4 and "kad" not in ed["Topline"] and "fad" in ed["Shuffled"]
    # understanding: the system describes c0 as nothing and c1 as a high tone and other words (7 errors in 7 words);
    # Shuffled describes each audio with the other's plan (the tones differ, the speech too)
    assert un["Topline"]["multiflam"] > 0.99 and un["Shuffled"]["multiflam"] < 0.01 and un["System"]["multiflam"] < 0.01
    assert un["Topline"]["tcpwer"] == 0 and un["Silence"]["tcpwer"] == 1.0 and un["System"]["tcpwer"] == 1.0, un
    text = metrics.format_tables(r)
    for word in ("Table 2: storytelling", "Table 1: editing", "Fig. 5: editFLAM↑ per kind", "Table 3: understanding",
                 "Plan adherence", "Regenerated", "Unchanged", "Shuffled", "Silence", "Topline", "add", "volume"):
        assert word in text, text


@pytest.mark.parametrize("scorer", [constant_scorer, random_scorer], ids=["constant", "random"])
def test_control_rows_expose_a_scorer_that_cannot_tell(tmp_path, scorer):
    torch.manual_seed(0)
    r = run_eval(tmp_path, scorer, system=False)
    st, ed = r["storytelling"]["all"], r["editing"]["all"]
    assert "System" not in st and "System" not in ed
    assert abs(st["Topline"]["multiflam"] - st["Shuffled"]["multiflam"]) < 0.1, st   # right = wrong: no signal
    assert abs(st["Topline"]["multiflam"] - st["Silence"]["multiflam"]) < 0.1, st
    for kind in ("add", "remove", "change"):
        row = r["editing"][kind]
        assert abs(row["Topline"]["editflam"] - row["Unchanged"]["editflam"]) < 0.2, (kind, row)


def test_system_folder_with_bad_outputs_is_refused_or_scored_in_part(tmp_path):
    conversations = fake_eval_split(tmp_path / "data")
    out = tmp_path / "out"
    copy_system(conversations, out, {c.id: c.turns[0].scene for c in conversations})
    (out / "c1" / "turn2.wav").unlink()                                        # missing
    (out / "c0" / "turn1.wav").write_bytes(b"not audio")                      # unreadable
    sf.write(out / "c0" / "turn0.wav", torch.zeros(44_100, 2).numpy(), 44_100)  # wrong rate
    (out / "c1" / "turn1.json").write_text(json.dumps({"seconds": 1.0, "plan": {"text": "a dog"}}))  # not a scene
    (out / "c1" / "caption.json").write_text("{")                             # not JSON
    bad = ["c1/turn2.wav: missing", "c0/turn1.wav: LibsndfileError", "c0/turn0.wav: ValueError('44100 Hz",
           "c1/turn1.json: SceneError", "c1/caption.json: JSONDecodeError"]
    with pytest.raises(ValueError, match="5 unusable outputs") as e:
        metrics.evaluate(conversations, tone_scorer, embed, out, render=render)
    assert all(b in str(e.value) for b in bad) and "--allow-missing" in str(e.value), str(e.value)
    r = metrics.evaluate(conversations, tone_scorer, embed, out, allow_missing=True, render=render)
    assert len(r["skipped"]) == 5 and r["storytelling"]["all"]["System"]["n"] == 1       # c1's story only
    assert r["editing"]["all"]["System"]["n"] == 1 and r["editing"]["all"]["Topline"]["n"] == 4   # c0's turn 2 only
    assert r["understanding"]["all"]["System"]["n"] == 1
    text = metrics.format_tables(r)
    assert "5 outputs skipped" in text and "c1/caption.json" in text, text


def test_cli_prints_the_control_rows_and_writes_json(tmp_path, monkeypatch, capsys):
    conversations = fake_eval_split(tmp_path / "data")
    copy_system(conversations, tmp_path / "out", {c.id: c.turns[0].scene for c in conversations})
    seen = {}

    def read_conversations(root, split="train"):
        seen["args"] = (Path(root), split)
        return conversations
    monkeypatch.setattr(metrics.copilot, "read_conversations", read_conversations)
    monkeypatch.setattr(metrics.copilot, "EspeakTTS", NoiseSFX)                # Regenerated renders speech as noise
    model = SmallFLAM(FLAM_PRESETS["toy"])
    torch.save({"kind": "flam", "config": asdict(model.config), "model": model.state_dict()}, tmp_path / "flam.pt")
    flam = ["--flam", str(tmp_path / "flam.pt")]
    metrics.main(["--data", str(tmp_path / "data"), *flam])                 # the control rows alone
    assert seen["args"] == (tmp_path / "data", "eval") and "System" not in capsys.readouterr().out.split("Rows")[0]
    metrics.main(["--data", str(tmp_path / "data"), "--system", str(tmp_path / "out"), *flam,
                  "--json", str(tmp_path / "r.json")])
    assert "System" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["understanding"]["all"]["System"]["tcpwer"] == 0


# -----------------------------------------------------------------------------
# Plan adherence on constructed scenes: a noise bed and one noise event, mixed by the copilot's mixer

class NoiseSFX:
    """A steady sfx tool (white noise), so every measurement has one right answer."""
    def render(self, sound, voice, rng):
        gen = torch.Generator().manual_seed(rng.getrandbits(32))
        return torch.randn(round(sound.duration * SAMPLE_RATE), generator=gen)


def noise_scene(pan=0.5, loudness=-16.0, start=1.0, duration=1.5, bed=True) -> copilot.Scene:
    sounds = [copilot.Sound(0, "sfx", "steady rain falling", -30, 0.0, 0.0, 6.0)] * bed + [
        copilot.Sound(1, "sfx", "a dog barking", loudness, pan, start, duration)]
    return copilot.Scene("", sounds)


def mix(sc: copilot.Scene) -> torch.Tensor:
    return copilot.mix_scene(sc, copilot.Renderer({"sfx": NoiseSFX()}, seed=0)).audio


@pytest.mark.parametrize("pan", [-1.0, -0.5, 0.0, 0.3, 0.9, 1.0])
def test_plan_adherence_is_zero_for_the_topline(pan):
    (m,) = metrics.plan_adherence(mix(noise_scene(pan)), noise_scene(pan))
    assert m["id"] == 1 and m["heard"], m
    assert abs(m["onset"]) <= 0.02 and abs(m["ild"]) < 0.5 and abs(m["level"]) < 0.3, m


def test_plan_adherence_measures_known_errors():
    audio = mix(noise_scene(pan=0.5, loudness=-16.0, start=1.2))
    (m,) = metrics.plan_adherence(audio, noise_scene(pan=-0.5, loudness=-22.0, start=1.0))
    want_ild = -2 * 20 * math.log10(math.tan(3 * math.pi / 8))                  # +-7.66 dB: the pan law at 0.5, -0.5
    assert m["onset"] == pytest.approx(0.2, abs=0.02) and m["ild"] == pytest.approx(want_ild, abs=0.5), m
    assert m["level"] == pytest.approx(6.0, abs=0.5), m                         # 6 LU louder than planned
    (m,) = metrics.plan_adherence(mix(noise_scene(bed=False)), noise_scene(bed=False))   # no bed: nothing subtracted
    assert abs(m["onset"]) <= 0.02 and abs(m["ild"]) < 0.1 and abs(m["level"]) < 0.1, m
    (m,) = metrics.plan_adherence(torch.zeros(2, 6 * SAMPLE_RATE), noise_scene())   # silence: never heard
    assert not m["heard"] and m["onset"] is None, m
    two = copilot.Scene("", noise_scene().sounds + [copilot.Sound(2, "sfx", "a cat meowing", -16, 0, 2.0, 1.0)])
    assert metrics.plan_adherence(mix(two), two) == []                          # overlapping events: not measured
    assert metrics.plan_adherence(mix(noise_scene()), json.loads(copilot.scene_to_json(noise_scene())))[0]["heard"]


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    t0 = time.time()
    _, q = train_synthetic(steps)
    print(f"SmallFLAM toy, {steps} steps of 8 clips in {time.time() - t0:.0f} s: held-out frame AUROC "
          f"{q['auroc']:.3f}, F1 {q['f1']:.3f} (chance AUROC 0.5), final loss {q['loss']:.3f}")
