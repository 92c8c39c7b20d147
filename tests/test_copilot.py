"""Tests for copilot.py: the scene schema, the tools, the BS.1770 mixer, both designers and datasets."""
import hashlib
import http.server
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import copilot as cp
from tokenizer import load_audio

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Synthesis runs many small tensor ops; on a busy 2-core machine intra-op threads only contend
    (measured 50x slower with 2 threads), so these tests run single-threaded, as dataset workers do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scene(*sounds, **lists) -> cp.Scene:
    return cp.Scene("a test scene", list(sounds), **lists)


def sfx(i, text="steady rain falling", loud=-20, pan=0.0, start=0.0, dur=8.0):
    return cp.Sound(i, "sfx", text, loud, pan, start, dur)


def tts(i, **kw):
    values = dict(loudness=-14, panning=0.3, start_time=1.0, duration=2.0, speaker="Anna", gender="female",
                  emotion="happy") | kw
    return cp.Sound(i, "tts", "Did you hear that?", **values)


class NoiseTTS:
    """A stand-in TTS tool (the toy world has no speech): seeded noise as long as the line."""
    def render(self, sound, voice, rng):
        n = int(sound.duration * cp.SAMPLE_RATE)
        return 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(rng.getrandbits(31)))


def sine(freq, dbfs, seconds, channels=2):
    t = torch.arange(int(seconds * cp.SAMPLE_RATE)) / cp.SAMPLE_RATE
    return (10 ** (dbfs / 20) * torch.sin(2 * math.pi * freq * t)).expand(channels, -1).clone()


# -----------------------------------------------------------------------------
# scene schema

def test_scene_json_round_trip_is_canonical_and_compact():
    s = scene(sfx(0, loud=-22.04, dur=8.0), tts(3), sfx(5, "a dog barking", -12.5, -0.333, 1.25, 2.5),
              added=[5], removed=[4])
    text = cp.scene_to_json(s)
    assert cp.parse_scene(text) == s
    stripped = text
    for words in ("a test scene", "steady rain falling", "a dog barking", "Did you hear that?"):
        stripped = stripped.replace(words, "")
    assert " " not in stripped
    assert text.startswith('{"description":"a test scene","added":[5],"changed":[],"removed":[4],"text":[{"tool":"sfx"')
    assert '"loudness":-22,' in text and '"duration":8,' in text and '"panning":-0.33,' in text  # rounded, shortest
    assert '"speaker":"Anna","gender":"female","emotion":"happy","loudness":-14' in text       # paper key order
    assert cp.parse_scene("Sure! Here is the plan:\n```json\n" + text + "\n```") == s


@pytest.mark.parametrize("text, message", [
    ("no json here", "no JSON object"),
    ('{"description": "x", "added": [], ', "invalid JSON"),
    ('{"description": "x", "added": [], "changed": [], "removed": []}', "missing ['text']"),
    ('{"description": "x", "added": [], "changed": [], "removed": [], "text": [], "mood": 1}', "unknown ['mood']"),
    ('{"description": "x", "added": ["1"], "changed": [], "removed": [], "text": []}',
     "added must be a list of integer ids"),
    ('{"description": "x", "added": [], "changed": [], "removed": [], "text": [{"tool": "sfx", "text": "rain", '
     '"loudness": "loud", "panning": 0, "start_time": 0, "duration": 8, "id": 0}]}',
     "loudness must be a finite number"),
    ('{"description": "x", "added": [], "changed": [], "removed": [], "text": [{"tool": "sfx", "text": "rain", '
     '"panning": 0, "start_time": 0, "duration": 8, "id": 0}]}', "missing keys ['loudness']"),
])
def test_parse_scene_errors_name_the_problem(text, message):
    with pytest.raises(cp.SceneError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cp.parse_scene(text)


def test_num_frames_is_ceil_of_latest_end_time_times_the_frame_rate():
    assert scene(sfx(0, dur=8.0)).num_frames(40) == 320 and scene(sfx(0, dur=8.0)).num_frames(10) == 80
    assert scene(sfx(0, dur=2.35)).num_frames(40) == 94      # 2.35 * 40 = 94.00000000000001 in floats
    assert scene(sfx(0, dur=3.0), sfx(1, start=2.0, dur=1.01)).num_frames(40) == 121
    assert scene(sfx(0, dur=3.0), sfx(1, start=2.0, dur=1.01)).num_frames(10) == 31


def test_valid_scene_has_no_violations():
    assert cp.validate_scene(scene(sfx(0, pan=0.1), sfx(1, "a dog barking", -12, -0.7, 1.0, 3.0), tts(2))) == []
    assert cp.validate_scene(cp.Scene(" ", [sfx(0)])) == ["scene: description is empty (describe the whole soundscape)"]


@pytest.mark.parametrize("sounds, lists, message", [
    ([sfx(0, loud=-35)], {}, "sound 0: loudness -35.0 dB outside [-30, -10]"),
    ([sfx(0, loud=-5)], {}, "sound 0: loudness -5.0 dB outside"),
    ([sfx(0), sfx(1, pan=1.5, dur=2)], {}, "sound 1: panning 1.5 outside [-1, 1]"),
    ([sfx(0), sfx(1, start=4.5, dur=1)], {}, "sound 1: start_time 4.5 s outside [0, 4]"),
    ([sfx(0, dur=8.5), sfx(1, start=3.0, dur=5.5)], {}, "start_time + duration = 8.5 s exceeds 8"),
    ([sfx(0), sfx(1, dur=0)], {}, "sound 1: duration 0.0 s must be positive"),
    ([sfx(0), sfx(0, "a dog barking", dur=2)], {}, "sound 0: id used by 2 sounds"),
    ([sfx(0), cp.Sound(1, "music", "a song", -20, 0, 0, 2)], {}, "sound 1: tool 'music' unknown"),
    ([sfx(0), sfx(1, " ", dur=2)], {}, "sound 1: text is empty"),
    ([sfx(0), tts(1, speaker=None)], {}, "sound 1: a tts sound needs a speaker and an emotion"),
    ([sfx(0), tts(1, gender="robot")], {}, "sound 1: tts gender 'robot' must be"),
    ([sfx(0), cp.Sound(1, "sfx", "a dog barking", -20, 0, 0, 2, speaker="Rex")], {},
     "sound 1: speaker/gender/emotion belong to tts"),
    ([sfx(0, pan=0.5)], {}, "scene: no ambience"),                                    # not centred
    ([sfx(0, start=1.0, dur=7.0)], {}, "scene: no ambience"),                         # does not start at 0
    ([sfx(0, dur=4.0), sfx(1, "a dog barking", -12, 0.7, 2.0, 4.0)], {}, "scene: no ambience"),  # shorter than one
    ([tts(0, start_time=0.0, panning=0.0, duration=8.0)], {}, "scene: no ambience"),  # speech is not ambience
    ([], {}, "scene: 0 sounds"),
    ([sfx(i, dur=8) for i in range(11)], {}, "scene: 11 sounds"),
    ([sfx(0)], {"added": [0]}, "scene: added must be empty in a first scene"),
])
def test_each_rule_rejects_a_crafted_scene(sounds, lists, message):
    errors = cp.validate_scene(scene(*sounds, **lists))
    assert errors and all(message in e for e in errors), \
        f"expected only violations containing {message!r}, got {errors}"


def test_a_shared_id_is_reported_once():
    errors = cp.validate_scene(scene(sfx(0), sfx(4, "a dog barking", dur=2), sfx(4, "a thunderclap", dur=2),
                                     sfx(4, "a cat meowing", dur=1)))
    assert errors == ["sound 4: id used by 3 sounds (ids must be unique)"], errors


def test_edit_lists_must_match_the_difference():
    before = scene(sfx(0), sfx(1, "a dog barking", -12, -0.5, 1.0, 3.0), sfx(2, "a clock ticking", -25, 0.4, 0.0, 5.0))
    def check(sounds, **lists):
        return cp.validate_scene(scene(*sounds, **lists), before)
    dog, clock = before.sounds[1], before.sounds[2]
    assert check([sfx(0), dog, clock]) == []                                                   # nothing changed
    assert check([sfx(0), dog, clock, sfx(7, "a cat meowing", -15, 0, 2, 1)], added=[7]) == []  # add
    assert check([sfx(0), dog], removed=[2]) == []                                              # remove
    for field, value in (("loudness", -18), ("panning", 0.5), ("start_time", 2.0), ("duration", 2.0)):  # "changed"
        moved = replace(dog, **{field: value})
        assert check([sfx(0), moved, clock], changed=[1]) == [], field
        assert check([sfx(0), moved, clock], changed=[1, 1]) == ["sound 1: listed more than once in changed"]
        assert "sound 1: is changed relative to the previous scene but not listed in changed" in \
            check([sfx(0), moved, clock])
    assert "sound 7: is added relative to the previous scene but not listed in added" in \
        check([sfx(0), dog, clock, sfx(7, dur=2)])
    assert "sound 2: is removed relative to the previous scene but not listed in removed" in check([sfx(0), dog])
    assert "sound 1: listed in changed but it was not changed" in check([sfx(0), dog, clock], changed=[1])
    assert "sound 2: listed in removed but it was not removed" in check([sfx(0), dog, clock], removed=[2])
    assert "sound 0: listed in added but it was not added" in check([sfx(0), dog, clock], added=[0])
    renamed = replace(dog, text="a cat meowing")                 # new caption under the same id
    assert any(e.startswith("sound 1: tool, text or voice changed under the same id")
               for e in check([sfx(0), renamed, clock]))


def test_caption_of_keeps_sounds_and_clears_edit_lists():
    s = scene(sfx(0), sfx(4, "a dog barking", -12, -0.5, 1.0, 3.0), added=[4], removed=[2])
    c = cp.caption_of(s)
    assert c.sounds == s.sounds and c.description == s.description and (c.added, c.changed, c.removed) == ([], [], [])


# -----------------------------------------------------------------------------
# loudness (ITU-R BS.1770-4), panning, the mixer

def test_meter_reads_known_sines():
    # BS.1770: the -0.691 offset makes a 1 kHz sine read its level; a 0 dBFS sine in one channel is -3.01 LKFS.
    assert cp.integrated_loudness(sine(1000, -20, 5)) == pytest.approx(-20.0, abs=0.05)
    assert cp.integrated_loudness(sine(1000, 0, 5, channels=1)) == pytest.approx(-3.01, abs=0.05)
    assert cp.integrated_loudness(sine(1000, -23, 3)) == pytest.approx(-23.0, abs=0.05)


def test_k_weighting_equals_direct_iir_filtering():
    signal_ = pytest.importorskip("scipy.signal")
    x = torch.randn(2, 30_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = x.numpy()
    for b, a in cp._K_WEIGHTING:
        y = signal_.lfilter(b, a, y)
    assert torch.allclose(cp.k_weight(x), torch.from_numpy(y), atol=1e-9)


def _expected_loudness(segments):
    """BS.1770-4 integrated loudness of 1 kHz sines held at piecewise-constant levels [(seconds, dBFS per
    channel)], computed from the standard's text: 400 ms blocks every 100 ms, block power = time-weighted
    mean of the segment powers, gates at -70 LUFS and 10 LU below the absolutely gated mean."""
    bounds, t = [], 0.0
    for seconds, db in segments:
        bounds.append((t, t + seconds, 10 ** (db / 10)))
        t += seconds
    powers = [sum(max(0.0, min(b, 0.1 * j + 0.4) - max(a, 0.1 * j)) * p for a, b, p in bounds) / 0.4
              for j in range(round((t - 0.4) / 0.1) + 1)]
    gated = [p for p in powers if p > 10 ** (-70 / 10)]
    relative = sum(gated) / len(gated) / 10
    kept = [p for p in gated if p > relative]
    return 10 * math.log10(sum(kept) / len(kept))


@pytest.mark.parametrize("segments", [[(4, -20), (4, -200)],      # silence: absolute gate
                                      [(4, -20), (4, -45)],       # 25 dB quieter: relative gate
                                      [(4, -20), (4, -26)],       # 6 dB quieter: kept
                                      [(1, -30), (2, -18), (1.5, -24)]])
def test_gating_follows_the_standard(segments):
    x = torch.cat([sine(1000, db, seconds) for seconds, db in segments], 1)
    assert cp.integrated_loudness(x) == pytest.approx(_expected_loudness(segments), abs=0.02)


def test_short_sounds_are_tiled_and_silence_floors_at_minus_70():
    assert cp.integrated_loudness(sine(1000, -20, 0.1)) == pytest.approx(-20, abs=0.2)
    assert cp.integrated_loudness(torch.zeros(2, 48_000)) == -70.0
    assert cp.integrated_loudness(torch.zeros(2, 0)) == -70.0


@pytest.mark.parametrize("p", [-1.0, -0.5, 0.0, 0.3, 1.0])
def test_pan_gains_follow_the_constant_power_law(p):
    left, right = cp.pan_gains(p)
    assert (left, right) == pytest.approx((math.cos((p + 1) * math.pi / 4), math.sin((p + 1) * math.pi / 4)))
    assert left ** 2 + right ** 2 == pytest.approx(1.0)
    mix = cp.mix_scene(scene(sfx(0, "a siren wailing", -20, p, 0, 3)), cp.Renderer(seed=1)).audio
    energy = mix.pow(2).sum(1)
    assert float(energy[1] / energy.sum()) == pytest.approx(right ** 2, abs=1e-4)


@pytest.mark.parametrize("sound", [sfx(0, "steady rain falling", pan=0.4, start=1.0, dur=3.0),
                                   sfx(0, "a dog barking", pan=-0.8, start=0.5, dur=4.0),
                                   sfx(0, "church bells ringing", dur=6.0),
                                   sfx(0, "knocking on a wooden door", pan=1.0, start=2.0, dur=3.0),
                                   tts(0, start_time=1.0, duration=3.0, loudness=-20)])
def test_a_sound_mixed_at_minus_20_lufs_measures_minus_20(sound):
    sound = replace(sound, loudness=-20)
    mix = cp.mix_scene(scene(sound), cp.Renderer({"sfx": cp.ProceduralSFX(), "tts": NoiseTTS()}, seed=3))
    assert mix.audio.shape == (2, scene(sound).num_frames(40) * 1200)
    assert cp.integrated_loudness(mix.audio) == pytest.approx(-20, abs=0.5)


def test_limiter_keeps_peaks_and_labels():
    x = 0.1 * torch.randn(48_000, generator=torch.Generator().manual_seed(0))   # peaks below 0.5
    x[1000] = 30.0                                                             # one huge spike
    y, reduction = cp.limit_peaks(x, 0.5)
    assert float(y.abs().max()) <= 0.5 and reduction == pytest.approx(20 * math.log10(0.5 / 30), abs=0.01)
    assert torch.equal(cp.limit_peaks(x * 1e-3, 0.5)[0], x * 1e-3)            # quiet input untouched
    assert torch.equal(y[2000:], x[2000:]) and float(y[1000]) == pytest.approx(0.5)  # only near the spike
    knock = cp.Renderer(seed=0).render(sfx(0, "knocking on a wooden door", dur=3))
    level, reached = cp.set_loudness(knock, -14)                               # needs limiting to get there
    assert float(level.abs().max()) <= cp.SOUND_CEILING + 1e-6
    assert reached == pytest.approx(-14, abs=0.1) and cp.integrated_loudness(level) == pytest.approx(reached, abs=0.01)


def test_loud_scene_is_limited_not_clipped():
    loud = scene(sfx(0, "ocean waves crashing on the shore", -10, 0, 0, 6),
                 sfx(1, "the hum of an electric fan", -10, 0, 0, 6), sfx(2, "a police siren wailing", -10, 0, 1, 4))
    mix = cp.mix_scene(loud, cp.Renderer(seed=0))
    assert float(mix.audio.abs().max()) <= cp.MIX_CEILING + 1e-6 and mix.limited_db < 0


def test_activity_is_energy_based_inside_the_placement():
    mix = cp.mix_scene(scene(sfx(0, dur=6.0), sfx(1, "three knocks on a door", -15, 0.5, 1.0, 3.0)),
                       cp.Renderer(seed=2))
    assert mix.activity[0] == [(0.0, 6.0)]                                     # a bed is active throughout
    knocks = mix.activity[1]
    assert knocks and all(1.0 <= a < b <= 4.0 for a, b in knocks)              # inside the placement
    assert sum(b - a for a, b in knocks) < 1.5                                 # the gaps between knocks are not active
    for a, b in knocks:                                                        # on the 40 Hz grid
        assert (a * 40) == pytest.approx(round(a * 40)) and (b * 40) == pytest.approx(round(b * 40))


# -----------------------------------------------------------------------------
# tools and the render cache

def test_a_mix_only_edit_renders_nothing_again():
    renderer = cp.Renderer({"sfx": cp.ProceduralSFX(), "tts": NoiseTTS()}, seed=0)
    first = scene(sfx(0), sfx(1, "a dog barking", -12, -0.5, 1.0, 3.0), tts(2))
    cp.mix_scene(first, renderer)
    assert renderer.renders == 3
    moved = [sfx(0, loud=-26), cp.Sound(1, "sfx", "a dog barking", -18, 0.9, 2.5, 3.0),
             tts(2, panning=-0.9, start_time=4.0)]
    cp.mix_scene(scene(*moved, changed=[0, 1, 2]), renderer)                   # loudness, panning, start: mix only
    assert renderer.renders == 3, "a loudness/panning/start change must not call a tool"
    cp.mix_scene(scene(sfx(0), sfx(3, "a cat meowing", -12, -0.5, 1.0, 3.0), tts(4, emotion="sad")), renderer)
    assert renderer.renders == 5                                               # new caption, new emotion: new renders
    cp.mix_scene(scene(sfx(0), sfx(1, "a dog barking", -12, -0.5, 1.0, 2.0)), renderer)
    assert renderer.renders == 6                                  # a new length is a tool parameter (paper A.2)


def test_library_has_15_learnable_classes_with_one_caption_each():
    """5 beds and 10 events, each caption its own class, each non-silent and separable from the others by a
    nearest-centroid classifier on coarse features (log band energies, envelope modulation) across seeds."""
    assert len(cp.SOUND_CLASSES) == 15 and len(cp.BEDS) == 5 and len(cp.EVENTS) == 10
    assert all(cp.caption_to_class(c.caption) == n for n, c in cp.SOUND_CLASSES.items())
    assert len({c.caption for c in cp.SOUND_CLASSES.values()}) == 15
    edges = torch.logspace(math.log10(50), math.log10(16_000), 13)
    def features(x):
        spec = torch.stft(x, 1024, 480, window=torch.hann_window(1024), return_complex=True).abs() ** 2  # [513, T]
        f = torch.linspace(0, 24_000, 513)
        bands = torch.stack([spec[(f >= lo) & (f < hi)].sum(0) for lo, hi in zip(edges[:-1], edges[1:])])  # [12, T]
        env = bands.sum(0)
        return torch.cat([torch.log10(bands.mean(1) / bands.mean(1).sum() + 1e-9),
                          (env.std() / env.mean()).log10()[None]])
    feats = {n: [features(cp.ProceduralSFX().render(sfx(0, c.caption, dur=3.0), None, random.Random(seed)))
                 for seed in range(4)]
             for n, c in cp.SOUND_CLASSES.items()}
    centroids = {n: torch.stack(v[:2]).mean(0) for n, v in feats.items()}    # "train" on seeds 0-1, test on 2-3
    hits = sum(min(centroids, key=lambda m: float((centroids[m] - x).norm())) == n
               for n, v in feats.items() for x in v[2:])
    assert hits / (2 * len(feats)) >= 0.85, f"only {hits} of {2 * len(feats)} renders classified correctly"


def test_renders_are_seeded_and_free_captions_go_by_keywords():
    a = cp.Renderer(seed=7).render(sfx(0, "a dog barking", dur=3))
    assert torch.equal(a, cp.Renderer(seed=7).render(sfx(0, "a dog barking", dur=3)))
    assert not torch.equal(a, cp.Renderer(seed=8).render(sfx(0, "a dog barking", dur=3)))
    for caption, name in (("a big dog barks at the postman", "dog"), ("an ambulance siren in the distance", "siren"),
                          ("waves lapping at a beach", "waves"), ("a kitten mewing softly", "cat"),
                          ("heavy footsteps on the stairs", "footsteps"), ("logs burning in a fireplace", "fire")):
        assert cp.caption_to_class(caption) == name, caption


def test_speech_needs_a_tts_tool_and_voices_persist():
    assert cp.voice_for("Anna", "female") == cp.voice_for(" anna ", "female")          # one voice per speaker
    assert cp.voice_for("Anna", "female") != cp.voice_for("Anna", "male")             # a new gender: a new voice
    with pytest.raises(ValueError, match=r"no 'tts' tool \(have \['sfx'\]\); speech needs a TTS tool: --tts espeak"):
        cp.Renderer(seed=0).render(tts(0))


def test_espeak_tts_when_installed():
    if cp.shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    x = cp.Renderer({"sfx": cp.ProceduralSFX(), "tts": cp.EspeakTTS()}).render(tts(0))
    assert x.shape == (2 * 48_000,) and x.abs().max() > 0.01


def test_a_plugged_tool_is_called_with_sound_voice_and_rng():
    calls = []
    class Beep:
        def render(self, sound, voice, rng):
            calls.append((sound.text, voice, type(rng)))
            return torch.ones(10)                                               # too short: padded by the renderer
    x = cp.Renderer({"sfx": Beep(), "tts": Beep()}).render(tts(0))
    assert calls == [("Did you hear that?", cp.voice_for("Anna", "female"), random.Random)] and x.shape == (96_000,)
    with pytest.raises(ValueError, match="no 'sfx' tool"):
        cp.Renderer({"tts": Beep()}).render(sfx(0))


# -----------------------------------------------------------------------------
# the offline designer: the toy world's user and sound designer

def conversation(i, n_turns=5, kinds=None, seeds=cp.TRAIN_SEEDS):
    rng = random.Random(i)
    return cp.OfflineCopilot().conversation(rng.choice(seeds), rng, n_turns, kinds)


def stories(n, n_events=None):
    """n (prompt, scene, specs) story turns, specs stating the bed first."""
    return [cp._story(cp.Simulation(random.Random(i), []), n_events) for i in range(n)]


def said(text: str, side: str) -> bool:
    """Whether the prompt states `side` (a longer phrase wins: "all the way to the left" is not "to the left")."""
    spans = [(m.start(), m.end(), s) for s, (_, words) in cp.SIDES.items() for w in words
             for m in re.finditer(r"\b" + re.escape(w) + r"\b", text)]
    return any(s == side and not any(a <= a2 and b2 <= b and (a, b) != (a2, b2) for a, b, _ in spans)
               for a2, b2, s in spans)


def bare(text: str) -> str:
    """Lower case without articles and level adjectives, to find a class's words in the user's."""
    skip = {"a", "an", "the", "some", "very"} | {w for adjectives, _ in cp.LEVELS.values() for w in adjectives}
    return " ".join(w for w in text.lower().split() if w not in skip)


def said_time(text: str, t: float) -> bool:
    if t == 0:
        return any(w in text for w in ("at the start", "right at the beginning", "from the start", "straight away"))
    number = ("one", "two", "three")[int(t) - 1] if t.is_integer() else "-"
    return re.search(rf"\b({t:g}|{number}) seconds?\b|\bthe {t:g} second mark", text) is not None


def test_stories_are_valid_and_honour_every_stated_side_level_and_time():
    counts = {"side": 0, "level": 0, "start": 0}
    for text, sc, specs in stories(1000):
        assert cp.validate_scene(sc) == [] and 4 <= sc.duration <= 6 and 2 <= len(sc.sounds) <= 4, text
        bed, events = sc.sounds[0], sc.sounds[1:]
        assert cp.ambience_ids(sc)[:1] == [bed.id] and bed.end == sc.duration
        assert [cp.caption_to_class(s.text) for s in sc.sounds] == [spec.cls for spec in specs]
        assert bed.loudness in {"loud": range(-22, -19), "quiet": range(-30, -27)}.get(specs[0].level, range(-27, -22))
        for s, spec in zip(events, specs[1:]):
            top = cp.SOUND_CLASSES[spec.cls].top
            lo, hi = {"loud": (top - 2, top), "quiet": (-28, -24)}.get(spec.level, (-23, top - 3))
            assert lo <= s.loudness <= hi, (text, spec, s)
            if spec.side:
                (a, b), _ = cp.SIDES[spec.side]
                assert a <= s.panning <= b and said(text, spec.side), (text, spec, s)
            if spec.start is not None:
                assert s.start_time == spec.start and said_time(text, spec.start), (text, spec, s)
            counts["side"] += spec.side is not None
            counts["level"] += spec.level is not None
            counts["start"] += spec.start is not None
    assert all(c > 150 for c in counts.values()), counts


def test_stories_name_their_sounds_in_three_kinds_of_wording():
    modes = {"request": 0, "sentences": 0, "setting": 0}
    texts, openings = set(), set()
    for text, sc, specs in stories(1000):
        lower = bare(text)
        for spec in specs:                                  # every sound is named (a bed may be implied by a setting)
            c = cp.SOUND_CLASSES[spec.cls]
            words = c.nouns.split("|") + c.clauses.split("|") + (c.settings.split("|") if c.bed else [])
            assert any(bare(w) in lower for w in words), (text, spec.cls)
        setting = any(bare(s) in lower for b in cp.BEDS for s in cp.SOUND_CLASSES[b].settings.split("|"))
        clauses = sum(any(bare(cl) in lower for cl in cp.SOUND_CLASSES[s.cls].clauses.split("|")) for s in specs)
        modes["setting" if setting and clauses == 0 else "sentences" if clauses == len(specs) else "request"] += 1
        texts.add(text)
        openings.add(" ".join(text.split()[:2]))
    assert all(m > 100 for m in modes.values()), modes
    assert len(texts) > 990 and len(openings) > 150, (len(texts), len(openings))


def test_every_edit_kind_is_valid_of_its_kind_and_worded_by_its_sound():
    kinds, instructions = {}, set()
    for i in range(300):
        turns = conversation(i)
        assert turns[0][1] == "story"
        for (_, _, before), (instruction, kind, after) in zip(turns, turns[1:]):
            assert cp.validate_scene(after, before) == [], instruction
            assert kind == "open" or cp.classify_edit(before, after) == kind, (kind, instruction)
            diff = cp.scene_diff(before, after)
            touched = [before.by_id()[i] for i in diff["removed"] + diff["changed"]]
            if kind in ("remove", "change", "volume", "pan"):   # the user calls the sound by its class's names
                names = cp.SOUND_CLASSES[cp.caption_to_class(touched[0].text)].names.split("|")
                assert any(re.search(rf"\b{n}\b", instruction.lower()) for n in names), (kind, instruction)
            if kind == "add":
                new = after.by_id()[diff["added"][0]]
                nouns = cp.SOUND_CLASSES[cp.caption_to_class(new.text)].nouns.split("|")
                assert any(bare(w) in bare(instruction) for w in nouns), instruction
            if kind == "pan":
                pan = after.by_id()[diff["changed"][0]].panning
                assert any(said(instruction, side) and a <= pan <= b for side, ((a, b), _) in cp.SIDES.items())
            if kind == "volume":
                louder = after.by_id()[diff["changed"][0]].loudness > touched[0].loudness
                assert ("louder" in instruction or " up" in instruction) == louder, instruction
            kinds[kind] = kinds.get(kind, 0) + 1
            instructions.add(instruction)
    assert set(kinds) == set(cp.EDIT_KINDS) and min(kinds.values()) > 100, kinds
    assert len(instructions) > 400, len(instructions)


def test_offline_designer_is_deterministic_and_fast_without_rendering():
    def text(turns):
        return [(a, b, cp.scene_to_json(c)) for a, b, c in turns]
    assert text(conversation(11)) == text(conversation(11)) and text(conversation(11)) != text(conversation(12))
    t = time.perf_counter()
    for i in range(1000):
        conversation(i, n_turns=3)
    seconds = time.perf_counter() - t
    assert seconds < 5, f"1000 three-turn conversations took {seconds:.1f} s"


def test_eval_conversations_follow_the_requested_kinds():
    kind_pairs = [["remove", "change"], ["open", "add"], ["volume", "pan"], ["add", "remove"], ["pan", "volume"],
                  ["change", "open"]]
    for i in range(60):
        kinds = kind_pairs[i % len(kind_pairs)]
        turns = conversation(i, 3, kinds, cp.EVAL_SEEDS)
        assert [k for _, k, _ in turns] == ["story"] + kinds and len(turns[0][2].sounds) == 3
    assert not set(cp.TRAIN_SEEDS) & set(cp.EVAL_SEEDS)


def test_t2a_asks_for_one_sound_in_the_users_words():
    names = set()
    for i in range(200):
        [(prompt, kind, sc)] = cp.OfflineCopilot().t2a(random.Random(i))
        c = cp.SOUND_CLASSES[cp.caption_to_class(sc.sounds[0].text)]
        assert kind == "t2a" and len(sc.sounds) == 1 and cp.validate_scene(sc) == [] and sc.sounds[0].text == c.caption
        assert prompt in c.nouns.split("|") and sc.sounds[0].loudness <= c.top
        names.add(c.name)
    assert names == set(cp.SOUND_CLASSES)


def test_seed_words_bias_the_classes():
    def share(seed_text, name):
        hits = 0
        for i in range(300):
            turns = cp.OfflineCopilot().conversation(seed_text, random.Random(i), 1)
            hits += any(cp.caption_to_class(s.text) == name for s in turns[0][2].sounds)
        return hits / 300
    assert share("The dog barked in the yard.", "dog") > share("The ship left the harbour.", "dog") + 0.3
    assert share("The ship left the harbour.", "waves") > 0.6


# -----------------------------------------------------------------------------
# the LLM backend against a fake OpenAI-compatible server

class FakeServer:
    """A chat-completions server on 127.0.0.1 that answers from a script (an int answer = that HTTP status)."""

    def __init__(self, answers):
        self.answers, self.requests = list(answers), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.requests.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                answer = outer.answers.pop(0)
                answer = answer(outer.requests[-1][1]) if callable(answer) else answer
                if isinstance(answer, int):
                    self.send_error(answer)
                    return
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _paper_answer(**loudness_of_sound_3):
    messages = cp._example(tts=False)
    for sound in messages[3]["content"][0]["text"]:
        if sound["id"] == 3:
            sound.update(loudness_of_sound_3)
    return "Here is the simulation:\n```json\n" + json.dumps(messages, indent=2) + "\n```"


def test_the_prompts_keep_their_bytes():
    """The SFX prompt is paper Fig. 8 word for word (its example: Figs. 9-10); the SFX + TTS prompt adds the tts
    tool in the same words. Both are pinned, so a reformatting of copilot.py cannot change a byte of either."""
    pinned = {False: "cb65c649b9b5af2648488740bda0acf23700a105cbd492824069a304aa43c6ed",
              True: "959af740d082a88ef7cb1f8c3d2e762da5286ef180d8d774ae4660f26e6c9f86"}
    for tts, expected in pinned.items():
        got = hashlib.sha256(cp._prompt(tts).encode()).hexdigest()
        assert got == expected, f"the {'SFX + TTS' if tts else 'SFX'} prompt changed (sha256 {got}); compare it " \
                                f"with paper appendix A, Fig. 8, then update the pin"


def test_llm_backend_round_trip_retries_a_malformed_answer():
    malformed = "```json\n[{\"role\": \"user\", \"content\": \"oops\""
    with FakeServer([malformed, _paper_answer(loudness=-45), _paper_answer()]) as server:
        llm = cp.LLMCopilot(server.url, "gemma-3-27b", attempts=3, speech=0.0)
        turns = llm.conversation("leaves rustle", random.Random(0), n_turns=2)
    assert [(k, len(s.sounds)) for _, k, s in turns] == [("story", 3), ("add", 4)]
    assert turns[1][0].startswith("I want to emphasize the delicate nature")
    assert turns[1][2].sounds[3] == cp.Sound(3, "sfx", "delicate flower petals rustling", -22, 0, 1.2, 2.5)
    assert llm.failures == 2 and len(server.requests) == 3
    path, first = server.requests[0]
    assert path == "/v1/chat/completions" and first["model"] == "gemma-3-27b"
    system, user = first["messages"][0], first["messages"][1]
    assert system["role"] == "system" and system["content"].startswith("You are an intelligent AI prompt engineer.")
    assert "one sound effects tool" in system["content"] and "leaves rustle" in user["content"]
    feedback = server.requests[2][1]["messages"]                               # the errors went back to the LLM
    assert feedback[-2]["role"] == "assistant"
    assert "sound 3: loudness -45.0 dB outside [-30, -10]" in feedback[-1]["content"]
    assert "invalid JSON" not in feedback[-1]["content"]
    assert "holds no valid JSON" in server.requests[1][1]["messages"][-1]["content"]


def test_llm_backend_speech_prompt_http_errors_and_giving_up():
    with FakeServer([_paper_answer()]) as server:
        turns = cp.LLMCopilot(server.url, "m", speech=1.0).conversation("rain", random.Random(0), n_turns=2)
    assert len(turns) == 2 and "two tools" in server.requests[0][1]["messages"][0]["content"]  # the SFX + TTS prompt
    speech = json.dumps(cp._example(tts=True))                        # speech in an answer to the SFX-only prompt
    with FakeServer([speech, speech]) as server:
        llm = cp.LLMCopilot(server.url, "m", attempts=2, speech=0.0)
        with pytest.raises(cp.CopilotError, match="sound 4 uses tts, but only the sfx tool exists"):
            llm.conversation("rain", random.Random(0), n_turns=3)
    with FakeServer([_paper_answer(loudness=-45)] * 2) as server:
        llm = cp.LLMCopilot(server.url, "m", attempts=2)
        with pytest.raises(cp.CopilotError, match="after 2 answers"):
            llm.conversation("rain", random.Random(0), n_turns=2)
    assert llm.failures == 2
    with FakeServer([404]) as server, pytest.raises(cp.CopilotError, match="HTTP Error 404"):
        cp.chat_completion(server.url, "m", [])


def test_parse_answer_checks_requested_edit_kinds():
    turns, problems = cp.parse_answer(_paper_answer(), n_turns=2, kinds=["remove"])
    assert [k for _, k, _ in turns] == ["story", "add"]
    assert problems == ["turn 2: the edit should be removing a sound, but the scene's difference is a add edit"]
    assert cp.parse_answer(_paper_answer(), n_turns=2, kinds=["open"])[1] == []
    with pytest.raises(cp.SceneError, match="expected a JSON list of 6 messages"):
        cp.parse_answer(_paper_answer(), n_turns=3)


def test_keep_invalid_keeps_a_renderable_conversation_flagged():
    with FakeServer([_paper_answer(loudness=-45)] * 2) as server:
        llm = cp.LLMCopilot(server.url, "m", attempts=2, keep_invalid=True)
        turns = llm.conversation("rain", random.Random(0), n_turns=2)
    assert llm.failures == 2 and turns[1][2].sounds[3].loudness == -45
    assert cp.validate_scene(turns[1][2], turns[0][2]) == ["sound 3: loudness -45.0 dB outside [-30, -10]"]


# -----------------------------------------------------------------------------
# datasets

def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copilot(out: Path, *flags: str) -> list[str]:
    return [sys.executable, str(REPO / "copilot.py"), "--out", str(out), "--n", "4", "--eval-n", "3", "--seed", "5",
            *flags]


def test_interrupted_dataset_job_resumes_to_the_same_bytes(tmp_path):
    env = os.environ | {"PYTHONPATH": str(REPO)}
    subprocess.run(_copilot(tmp_path / "full"), check=True, capture_output=True, env=env, timeout=300)
    job = subprocess.Popen(_copilot(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while len(list((tmp_path / "killed").rglob("*-*.json"))) < 2 and time.time() < deadline and job.poll() is None:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert len(list((tmp_path / "killed").rglob("*-*.json"))) < 7, "the job finished before it could be killed"
    subprocess.run(_copilot(tmp_path / "killed"), check=True, capture_output=True, env=env, timeout=300)
    full, resumed = _files(tmp_path / "full"), _files(tmp_path / "killed")
    assert sorted(full) == sorted(resumed) and all(full[k] == resumed[k] for k in full), "resumed dataset differs"
    assert not any(k.endswith(".tmp") for k in resumed)

    train, evaluation = cp.read_conversations(tmp_path / "full"), cp.read_conversations(tmp_path / "full", "eval")
    assert [c.id for c in train] == [f"train-{i:07d}" for i in range(4)] and len(evaluation) == 3
    assert all(c.seed_text in cp.EVAL_SEEDS and [t.kind for t in c.turns][0] == "story" and len(c.turns) == 3
               for c in evaluation)
    assert sorted(t.kind for c in evaluation for t in c.turns[1:]) == sorted(cp.EDIT_KINDS)   # six kinds, evenly
    turn = train[0].turns[-1]
    audio = load_audio(turn.audio)
    assert audio.shape == (2, turn.scene.num_frames(40) * 1200) and audio.abs().max() > 0.01
    assert set(turn.activity) == {s.id for s in turn.scene.sounds}
    for c in train + evaluation:
        assert all(t.violations == [] for t in c.turns)
        for before, after in zip(c.turns, c.turns[1:]):
            assert cp.validate_scene(after.scene, before.scene) == []

    bad = next((tmp_path / "full" / "train").rglob("train-0000001.json"))
    bad.write_text(bad.read_text()[:-20])
    with pytest.raises(ValueError, match="train-0000001.json: malformed conversation file.*--data.skip_bad true"):
        cp.read_conversations(tmp_path / "full")
    kept = cp.read_conversations(tmp_path / "full", skip_bad=True)          # left out and counted (a warning)
    assert [c.id for c in kept] == ["train-0000000", "train-0000002", "train-0000003"]
    with pytest.raises(FileNotFoundError, match="no such split"):
        cp.read_conversations(tmp_path / "full", "test")
    with pytest.raises(ValueError, match="was written with other settings"):
        cp.write_dataset(tmp_path / "full", 1, 0, cp.DatasetConfig(seed=6))


def test_llm_dataset_counts_and_drops_invalid_conversations(tmp_path):
    def answer(body):  # the paper's example, cut to the number of interactions asked for
        n = int(re.search(r"Simulate exactly (\d+) interactions", body["messages"][1]["content"]).group(1))
        return json.dumps(cp._example(tts=False)[: 2 * n])
    cfg = cp.DatasetConfig(backend="openai", attempts=2, max_turns=2)
    with FakeServer([answer] * 2) as server:
        stats = cp.write_dataset(tmp_path / "good", 2, 0, replace(cfg, base_url=server.url))
    assert (stats["written"], stats["failed"], stats["invalid_answers"]) == (2, 0, 0)
    for c in cp.read_conversations(tmp_path / "good"):
        assert [t.kind for t in c.turns] == ["story"] + ["add"] * (len(c.turns) - 1)
        assert c.turns[0].scene.sounds[0].text == "gentle birdsong outside a window"
        assert all(t.violations == [] and t.audio.is_file() for t in c.turns)
    with FakeServer([_paper_answer(loudness=-45)] * 4) as server:
        stats = cp.write_dataset(tmp_path / "bad", 2, 0, replace(cfg, base_url=server.url, max_turns=1))
    assert (stats["written"], stats["failed"], stats["invalid_answers"]) == (0, 2, 4)  # counted, never kept
    assert cp.read_conversations(tmp_path / "bad") == []


def test_parallel_workers_write_the_same_bytes(tmp_path):
    cfg = cp.DatasetConfig(seed=9, t2a_frac=0.5, max_turns=2)
    one = cp.write_dataset(tmp_path / "one", 3, 0, cfg, workers=1)
    two = cp.write_dataset(tmp_path / "two", 3, 0, cfg, workers=2)
    assert one["written"] == two["written"] == 3 and _files(tmp_path / "one") == _files(tmp_path / "two")
    assert cp.write_dataset(tmp_path / "one", 3, 0, cfg)["skipped"] == 3                  # nothing to redo
