"""AudioCopilot: the data simulator behind AudioChat (paper section 3.2 and appendix A, Figs. 8-10).

A simulated user asks for an audio story and edits it turn by turn; a simulated sound designer answers every
turn with a scene, the JSON plan of every sound (paper Figs. 9-10): tool parameters (caption or transcript,
voice, length) and mix parameters (loudness, panning, start time). Tools render each sound, the mixer places
them into 48 kHz stereo, and the scene JSON becomes AudioChat's structured chain of thought.

Top to bottom:
  the scene   Sound, Scene, scene_to_json (canonical: what the model reads and writes), parse_scene,
              validate_scene (every rule of the Fig. 8 prompt), scene_diff (added/removed/changed), caption_of
  the tools   ProceduralSFX (25 sound classes: noise bands, partials, event rhythms) and FormantTTS, or any
              object with render(sound, voice, rng) -> mono [S] at 48 kHz; Renderer caches renders by tool
              parameters, so a loudness, panning or start-time edit renders nothing again (paper A.2)
  the mixer   mix_scene: each sound levelled to its loudness where it sits in the mix (ITU-R BS.1770-4),
              constant-power panning, a 5 ms look-ahead peak limiter, energy-based activity (the FLAM labels)
  designers   OfflineCopilot, procedural (the default: no model, the same bytes on every machine), and
              LLMCopilot, any OpenAI-compatible chat server (vLLM serving Gemma 3 27B in paper A.1)
  datasets    write_dataset / read_conversations; conversation i depends only on (seed, split, i)

    python copilot.py --out data/toy --n 600 --eval-n 60 --workers 2
    python copilot.py --backend openai --base-url http://localhost:8000/v1 --model google/gemma-3-27b-it \\
        --out data/llm --n 100000 --eval-n 1200 --workers 32
    python -m pytest -q tests/test_copilot.py
"""
import argparse
import contextlib
import functools
import io
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple, Protocol

import soundfile as sf
import torch
from tqdm import tqdm

from tokenizer import FRAME_RATE, HOP, SAMPLE_RATE, resample, save_audio, write_atomic

log = logging.getLogger("copilot")

# The prompt's rules (paper Fig. 8), shared by the validator and both designers.
MAX_START, MAX_END = 4.0, 8.0     # s: latest start_time; latest start_time + duration
AMBIENCE_PAN = 0.1                # an ambience is centred: |panning| <= 0.1
MAX_SOUNDS, MAX_TURNS = 10, 5     # "up to 10 prompts" per designer message; "up to 5 interactions ... 10 messages"
EDIT_KINDS = ("open", "add", "remove", "change", "volume", "pan")  # StoryGen-Eval's six edit tasks (section 3.3)


# -----------------------------------------------------------------------------
# The scene schema (paper Figs. 9-10): one parser, one validator, one serialiser

class SceneError(ValueError):
    """A scene (or an LLM answer holding scenes) that cannot be used; the message says what and where."""


@dataclass
class Sound:
    """One sound of a scene. Numbers are snapped to the canonical grid on construction."""
    id: int
    tool: str                  # "sfx" (text-to-audio) or "tts" (speech)
    text: str                  # the SFX caption, or the TTS transcript
    loudness: float            # dB, integrated loudness in the mix, [-30, -10]
    panning: float             # [-1, 1], constant-power law (see pan_gains)
    start_time: float          # s, [0, 4]
    duration: float            # s, start_time + duration <= 8
    speaker: str | None = None  # tts only: who speaks; one voice per (speaker, gender) across turns
    gender: str | None = None   # tts only: "male" or "female"
    emotion: str | None = None  # tts only: e.g. "happy", "sad", "angry" (sets pitch and rate)

    def __post_init__(self):
        self.loudness, self.panning = float(round(self.loudness, 1)), float(round(self.panning, 2))
        self.start_time, self.duration = float(round(self.start_time, 2)), float(round(self.duration, 2))

    @property
    def end(self) -> float:
        return round(self.start_time + self.duration, 2)

    def mix_params(self) -> tuple:
        """What the mixer sees; a difference here puts the id in `changed` (paper Fig. 8)."""
        return (self.loudness, self.panning, self.start_time, self.duration)

    def tool_params(self) -> tuple:
        """What the tool sees (paper A.2: caption/transcript, voice, length); a change here renders again."""
        return (self.tool, self.text, self.speaker, self.gender, self.emotion, self.duration)


@dataclass
class Scene:
    """The designer's answer for one turn: a description, the edit lists and every sound."""
    description: str
    sounds: list[Sound]
    added: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return max((s.end for s in self.sounds), default=0.0)

    @property
    def num_frames(self) -> int:
        """Length of the audio span that follows the plan: ceil(latest end time * 40) latent frames."""
        return math.ceil(round(self.duration * FRAME_RATE, 6))

    def by_id(self) -> dict[int, Sound]:
        return {s.id: s for s in self.sounds}


_SOUND_KEYS = ("tool", "text", "speaker", "gender", "emotion", "loudness", "panning", "start_time", "duration", "id")
_SCENE_KEYS = ("description", "added", "changed", "removed", "text")


def scene_to_json(scene: Scene) -> str:
    """Canonical compact JSON (paper key order, sounds under "text", 8 not 8.0); what the model reads and writes."""
    sounds = [{k: int(v) if isinstance(v, float) and v.is_integer() else v
               for k, v in ((k, getattr(s, k)) for k in _SOUND_KEYS) if v is not None} for s in scene.sounds]
    obj = {"description": scene.description, "added": scene.added, "changed": scene.changed,
           "removed": scene.removed, "text": sounds}
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def parse_scene(text: str | dict) -> Scene:
    """A Scene from the first JSON object in `text` (surrounding prose or a ```json fence is ignored), or from
    a decoded JSON object. Types are checked here; ranges and the prompt's rules are validate_scene's job."""
    obj = text
    if isinstance(text, str):
        start = text.find("{")
        if start < 0:
            raise SceneError(f"no JSON object found in {text[:80]!r}")
        try:
            obj, _ = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError as e:
            raise SceneError(f"invalid JSON at character {e.pos}: {e.msg}") from e
    if not isinstance(obj, dict):
        raise SceneError(f"a scene must be a JSON object, got {type(obj).__name__}")
    missing, unknown = set(_SCENE_KEYS) - set(obj), set(obj) - set(_SCENE_KEYS) - {"type"}
    if missing or unknown:
        raise SceneError(f"scene keys: missing {sorted(missing)}, unknown {sorted(unknown)}; "
                         f"expected {', '.join(_SCENE_KEYS)}")
    if not isinstance(obj["description"], str) or not isinstance(obj["text"], list):
        raise SceneError("scene: description must be a string and \"text\" the list of sounds")
    for k in ("added", "changed", "removed"):
        if not isinstance(obj[k], list) or not all(type(i) is int for i in obj[k]):
            raise SceneError(f"scene: {k} must be a list of integer ids, got {obj[k]!r}")
    for n, d in enumerate(obj["text"]):
        if not isinstance(d, dict):
            raise SceneError(f"sound #{n}: must be an object")
        where = f"sound #{n} (id {d.get('id')!r})"
        missing = {"tool", "text", "loudness", "panning", "start_time", "duration", "id"} - set(d)
        unknown = set(d) - set(_SOUND_KEYS)
        if missing or unknown:
            raise SceneError(f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
        for k, v in d.items():
            if k == "id" and type(v) is not int:
                raise SceneError(f"{where}: id must be an integer, got {v!r}")
            if k in ("tool", "text", "speaker", "gender", "emotion") and not isinstance(v, str):
                raise SceneError(f"{where}: {k} must be a string, got {v!r}")
            if k in ("loudness", "panning", "start_time", "duration") and not (
                    type(v) in (int, float) and math.isfinite(v)):
                raise SceneError(f"{where}: {k} must be a finite number, got {v!r}")
    return Scene(obj["description"], [Sound(**d) for d in obj["text"]], obj["added"], obj["changed"], obj["removed"])


def ambience_ids(scene: Scene) -> list[int]:
    """Ids of the sounds that qualify as ambience: sfx, start 0, |panning| <= 0.1, lasting the whole scene."""
    return [s.id for s in scene.sounds if s.tool == "sfx" and s.start_time == 0
            and abs(s.panning) <= AMBIENCE_PAN and s.end >= scene.duration]


def scene_diff(previous: Scene | None, scene: Scene) -> dict[str, list[int]]:
    """The edit lists the paper defines (Fig. 8) for going from `previous` to `scene`: added = new ids, removed
    = vanished ids, changed = kept ids whose volume, panning, start time or duration differ. None: a first scene."""
    if previous is None:
        return {"added": [], "removed": [], "changed": []}
    old, new = previous.by_id(), scene.by_id()
    return {"added": sorted(new.keys() - old.keys()), "removed": sorted(old.keys() - new.keys()),
            "changed": sorted(i for i in new.keys() & old.keys() if new[i].mix_params() != old[i].mix_params())}


def validate_scene(scene: Scene, previous: Scene | None = None) -> list[str]:
    """Every rule of the paper's prompt (Fig. 8) that `scene` breaks, one message per violation.

    With `previous`, the edit lists must equal scene_diff. A new caption, transcript, voice or tool is a new
    sound: the old id goes to `removed` and the new sound takes a new id; keeping the id is a violation.
    """
    errors = [m for bad, m in (
        (not scene.description.strip(), "scene: description is empty (describe the whole soundscape)"),
        (not 1 <= len(scene.sounds) <= MAX_SOUNDS, f"scene: {len(scene.sounds)} sounds (allowed 1 to {MAX_SOUNDS})"),
        (scene.sounds and not ambience_ids(scene), "scene: no ambience (an sfx at start_time 0 with |panning| <= 0.1 "
                                                   "lasting as long as every other sound)")) if bad]
    ids = [s.id for s in scene.sounds]
    for i, s in enumerate(scene.sounds):
        tts = s.tool == "tts"
        errors += [f"sound {s.id}: {m}" for bad, m in (     # a shared id is reported once, at its first sound
            (ids.count(s.id) > 1 and ids.index(s.id) == i, f"id used by {ids.count(s.id)} sounds (ids must be unique)"),
            (s.tool not in ("sfx", "tts"), f"tool {s.tool!r} unknown (use \"sfx\" or \"tts\")"),
            (not s.text.strip(), "text is empty (give a caption or a transcript)"),
            (not -30 <= s.loudness <= -10, f"loudness {s.loudness} dB outside [-30, -10]"),
            (not -1 <= s.panning <= 1, f"panning {s.panning} outside [-1, 1]"),
            (not 0 <= s.start_time <= MAX_START, f"start_time {s.start_time} s outside [0, {MAX_START:g}]"),
            (s.duration <= 0, f"duration {s.duration} s must be positive"),
            (s.end > MAX_END, f"start_time + duration = {s.end} s exceeds {MAX_END:g} s"),
            (tts and not ((s.speaker or "").strip() and (s.emotion or "").strip()),
             "a tts sound needs a speaker and an emotion"),
            (tts and s.gender not in ("male", "female"), f"tts gender {s.gender!r} must be \"male\" or \"female\""),
            (not tts and (s.speaker, s.gender, s.emotion) != (None,) * 3,
             "speaker/gender/emotion belong to tts sounds only")) if bad]
    for k in ("added", "changed", "removed"):
        listed = getattr(scene, k)
        twice = sorted({i for i in listed if listed.count(i) > 1})
        errors += [f"sound {i}: listed more than once in {k}" for i in twice]
        if previous is None and listed:
            errors.append(f"scene: {k} must be empty in a first scene (nothing to edit yet), got {listed}")
    if previous is None:
        return errors
    old, new = previous.by_id(), scene.by_id()
    errors += [f"sound {i}: tool, text or voice changed under the same id (a new sound needs a new id: list {i} in "
               f"removed and the new sound in added)" for i in sorted(new.keys() & old.keys())
               if new[i].tool_params()[:5] != old[i].tool_params()[:5]]
    for k, actual in scene_diff(previous, scene).items():
        listed = set(getattr(scene, k))
        errors += [f"sound {i}: is {k} relative to the previous scene but not listed in {k}"
                   for i in sorted(set(actual) - listed)]
        errors += [f"sound {i}: listed in {k} but it was not {k}" for i in sorted(listed - set(actual))]
    return errors


def caption_of(scene: Scene) -> Scene:
    """The understanding target for an input clip: the same sounds with empty edit lists."""
    return Scene(scene.description, [replace(s) for s in scene.sounds])


def classify_edit(previous: Scene, scene: Scene) -> str:
    """Which of the six edit kinds the difference between two valid scenes is (anything else: "open")."""
    old, new = previous.by_id(), scene.by_id()
    added, removed = new.keys() - old.keys(), old.keys() - new.keys()
    changed = [i for i in new.keys() & old.keys() if new[i] != old[i]]
    if not changed and bool(added) != bool(removed):
        return "add" if added else "remove"
    if not changed and len(added) == len(removed) == 1:
        return "change"
    if len(changed) == 1 and not added and not removed:
        a, b = new[changed[0]].mix_params(), old[changed[0]].mix_params()
        moved = [kind for kind, x, y in zip(("volume", "pan", "start", "length"), a, b) if x != y]
        if moved in (["volume"], ["pan"]):
            return moved[0]
    return "open"



# -----------------------------------------------------------------------------
# The SFX tool: a procedural sound library (the toy scale's stand-in for a text-to-audio model)

class Layer(NamedTuple):
    """One synthesis layer. A sound class sums one or two layers; two layers with equal timing fields
    (rate, jit, group, gap) share their event times (a knock's thud and its wooden ring)."""
    src: str                   # "noise": band-passed noise | "tone": harmonics of f0 | "bell": inharmonic partials
    lo: float                  # noise: low band edge, Hz | tone, bell: fundamental f0, Hz
    hi: float                  # noise: high band edge, Hz | tone: number of harmonics (amplitude 1/k)
    rate: float = 0.0          # events per second; 0 = one continuous event
    jit: float = 0.0           # timing randomness: 0 metronomic .. 1 Poisson
    dur: float = 0.1           # event length, s
    shape: str = "d"           # event envelope: "d" percussive decay, "g" gated (flat), "h" Hann swell
    group: int = 1             # events per group (door knocks come in threes)
    gap: float = 0.2           # spacing of the events inside a group, s
    glide: float = 1.0         # pitch ratio end/start within each event (chirps, meows)
    vib: tuple = (0.0, 0.0)    # vibrato (Hz, depth as a fraction of f0)
    am: tuple = (0.0, 0.0)     # amplitude modulation (Hz, depth); a negative Hz means random modulation below |Hz|
    gain: float = 1.0          # level of this layer (each layer is first normalised to unit RMS)
    notes: bool = False        # each event plays a random pentatonic note above f0 (melodies)


class SoundClass(NamedTuple):
    name: str                  # short noun the simulated user refers to ("remove the dog")
    bed: bool                  # can serve as the scene's ambience
    top: float                 # loudest loudness the designer gives it, dB (a clock ticks softly, a siren does not)
    keywords: str              # words of a seed sentence that call for this class
    captions: tuple            # caption paraphrases the designer writes
    layers: tuple              # synthesis recipe


L, C = Layer, SoundClass
SOUND_CLASSES = {c.name: c for c in (  # name, bed, top, keywords; captions; layers
    C("rain", True, -18, "rain storm wet drizzle roof umbrella",
      ("steady rain falling", "rain pattering on a roof", "a light rain shower"),
      (L("noise", 800, 12000, am=(-0.5, 0.2)), L("noise", 3000, 12000, rate=40, jit=1, dur=0.015, gain=0.6))),
    C("wind", True, -18, "wind gust hill mountain cold winter snow",
      ("wind blowing through trees", "a howling wind", "gusts of wind"),
      (L("noise", 150, 700, am=(-0.4, 0.9)), L("noise", 900, 1400, am=(-0.3, 1.0), gain=0.3))),
    C("stream", True, -16, "river stream water brook creek flowing",
      ("a babbling brook", "water flowing in a stream", "a gentle river"),
      (L("noise", 300, 6000, am=(-6, 0.4)), L("tone", 700, 1, rate=14, jit=1, dur=0.04, glide=1.8, gain=0.5))),
    C("fire", True, -20, "fire fireplace campfire warm burning",
      ("a crackling fire", "logs burning in a fireplace", "a campfire crackling"),
      (L("noise", 100, 1200, am=(-1, 0.3)), L("noise", 1500, 9000, rate=12, jit=1, dur=0.02))),
    C("waves", True, -16, "sea ocean beach waves shore harbour boat ship",
      ("ocean waves crashing on the shore", "waves lapping at a beach"),
      (L("noise", 100, 4000, am=(0.12, 0.95)),)),
    C("crowd", True, -16, "crowd people market cafe party restaurant",
      ("a crowd murmuring", "distant chatter in a busy cafe"),
      (L("noise", 250, 2500, am=(-4, 0.5)), L("tone", 170, 10, vib=(3, 0.15), am=(-3, 0.7), gain=0.5))),
    C("crickets", True, -14, "night summer field crickets insects evening",
      ("crickets chirping at night", "insects chirping in a field"),
      (L("tone", 4500, 2, rate=2.5, jit=0.2, dur=0.25, shape="g", am=(35, 1.0)),)),
    C("traffic", True, -16, "city street traffic road cars town urban",
      ("distant city traffic", "a busy street", "cars passing on a road"),
      (L("noise", 40, 1500, am=(-0.3, 0.5)), L("tone", 55, 12, am=(-0.2, 0.6), gain=0.3))),
    C("fan", True, -16, "room office fan machine quiet indoor study",
      ("the hum of an electric fan", "a quiet room with a humming fan"),
      (L("tone", 100, 6), L("noise", 200, 2000, gain=0.6))),
    C("thunder", False, -12, "thunder storm lightning dark",
      ("a rumble of thunder", "thunder rolling in the distance", "a thunderclap"),
      (L("noise", 30, 400, rate=0.3, jit=0.5, dur=3.0, am=(-8, 0.6)),
       L("noise", 800, 6000, rate=0.3, jit=0.5, dur=0.8, shape="h", gain=0.5))),
    C("birds", False, -12, "bird birds morning garden forest spring park dawn",
      ("birds singing", "gentle birdsong", "a songbird chirping"),
      (L("tone", 2800, 2, rate=5, jit=0.6, dur=0.12, shape="g", glide=1.5, vib=(30, 0.04)),)),
    C("dog", False, -12, "dog bark barking farm yard", ("a dog barking", "a dog barking twice", "a small dog yapping"),
      (L("tone", 450, 14, rate=0.7, jit=0.5, dur=0.22, shape="h", group=2, gap=0.3, glide=0.8),
       L("noise", 500, 3000, rate=0.7, jit=0.5, dur=0.22, shape="h", group=2, gap=0.3, gain=0.4))),
    C("knocking", False, -16, "door knock knocked visitor", ("knocking on a wooden door", "three knocks on a door"),
      (L("noise", 150, 900, rate=0.4, jit=0.3, dur=0.15, group=3, gap=0.22),
       L("tone", 190, 3, rate=0.4, jit=0.3, dur=0.2, group=3, gap=0.22))),
    C("footsteps", False, -18, "footsteps walk walked walking steps corridor stairs",
      ("footsteps on a wooden floor", "slow footsteps in a corridor"),
      (L("noise", 100, 2500, rate=1.9, jit=0.08, dur=0.25),)),
    C("clock", False, -22, "clock time tick ticking waiting hour",
      ("a clock ticking", "an antique clock ticking softly"),
      (L("noise", 2000, 9000, rate=2, dur=0.04), L("tone", 1800, 1, rate=2, dur=0.1))),
    C("bells", False, -12, "church bell bells village sunday wedding tower",
      ("church bells ringing", "a distant church bell tolling"),
      (L("bell", 400, 0, rate=0.5, dur=3.0),)),
    C("siren", False, -10, "siren police ambulance emergency accident",
      ("an ambulance siren passing", "a police siren wailing"),
      (L("tone", 700, 4, vib=(0.3, 0.3)),)),
    C("engine", False, -12, "car engine motor drive garage truck",
      ("a car engine idling", "a truck engine rumbling", "a motor running"),
      (L("tone", 42, 20, vib=(0.2, 0.08), am=(14, 0.3)), L("noise", 50, 500, gain=0.5))),
    C("phone", False, -12, "phone telephone call ring office", ("a telephone ringing", "an old phone ringing"),
      (L("tone", 440, 3, rate=0.33, dur=1.2, shape="g", am=(20, 0.8)),
       L("tone", 480, 3, rate=0.33, dur=1.2, shape="g", am=(20, 0.8)))),
    C("piano", False, -12, "piano music melody song concert", ("a slow piano melody", "soft piano notes"),
      (L("tone", 220, 8, rate=1.5, jit=0.1, dur=1.2, notes=True),)),
    C("typing", False, -20, "typing keyboard computer office writer desk letter",
      ("typing on a keyboard", "fast keyboard clicks"),
      (L("noise", 1500, 7000, rate=8, jit=0.7, dur=0.05),)),
    C("helicopter", False, -12, "helicopter rescue sky flying",
      ("a helicopter flying overhead", "helicopter blades chopping"),
      (L("noise", 60, 800, am=(12, 0.9)),)),
    C("cat", False, -12, "cat kitten meow pet kitchen", ("a cat meowing", "a kitten mewing softly"),
      (L("tone", 500, 8, rate=0.4, jit=0.5, dur=0.7, shape="h", glide=0.7, vib=(5, 0.02)),)),
    C("owl", False, -14, "owl night forest dark woods moon", ("an owl hooting", "an owl calling in the woods"),
      (L("tone", 380, 2, rate=0.5, dur=0.45, shape="h", group=2, gap=0.5, glide=0.9),)),
    C("horse", False, -16, "horse hooves gallop riding carriage",
      ("a horse galloping", "hooves clopping on cobblestones"),
      (L("noise", 80, 1500, rate=2.5, jit=0.05, dur=0.12, group=3, gap=0.09),)),
)}
CAPTION_CLASS = {c: k.name for k in SOUND_CLASSES.values() for c in k.captions}  # caption -> class name
_BELL = ((0.5, 0.5), (1.0, 1.0), (1.19, 0.6), (1.5, 0.4), (2.0, 0.5), (2.52, 0.3), (3.01, 0.2))  # (ratio, amplitude)
_PENTATONIC = (0, 2, 4, 7, 9, 12, 14)  # semitones above f0


def _band_noise(n: int, lo: float, hi: float, tilt: float, g: torch.Generator) -> torch.Tensor:
    """[n] unit-RMS Gaussian noise with a band-pass of 4th-order (Butterworth-like) edges at lo and hi Hz
    and a spectral tilt (f / 1 kHz) ** tilt, drawn directly in the frequency domain (one inverse FFT)."""
    f = torch.fft.rfftfreq(n, 1 / SAMPLE_RATE).clamp(min=1.0)
    X = torch.complex(torch.randn(len(f), generator=g), torch.randn(len(f), generator=g))
    x = torch.fft.irfft(X * (f / 1000) ** tilt / torch.sqrt((1 + (lo / f) ** 4) * (1 + (f / hi) ** 4)), n)
    return x / x.pow(2).mean().sqrt().clamp(min=1e-12)


def synth_layer(layer: Layer, n: int, pitch: float, rate: float, tilt: float, seed: int) -> torch.Tensor:
    """[n] one layer at 48 kHz, unit RMS; `pitch`, `rate` and `tilt` scale its frequencies, its event
    rate and its spectral slope (timbre)."""
    g, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    t = torch.arange(n) / SAMPLE_RATE
    env, f0 = torch.ones(n), torch.full((n,), layer.lo * pitch)
    if layer.rate:
        env, m, seconds = torch.zeros(n), int(layer.dur * SAMPLE_RATE), n / SAMPLE_RATE
        u = torch.arange(m) / SAMPLE_RATE                                      # s, time inside one event
        shape = {"d": (u / 0.003).clamp(max=1) * torch.exp(-4.6 * u / layer.dur),  # 3 ms attack, decay to -40 dB
                 "g": (torch.minimum(u, u.flip(0)) / 0.01).clamp(max=1),          # gated, 10 ms ramps
                 "h": torch.sin(math.pi * u / layer.dur) ** 2}[layer.shape]       # Hann swell
        glide = layer.glide ** torch.linspace(0, 1, m)
        # Event times come from seed // 2, shared by layers 2i and 2i+1: a knock's thud and its ring coincide.
        # The first group starts early enough to fit inside the sound when it can, so no sound is silent.
        timing, period, span = random.Random(seed // 2), 1 / (layer.rate * rate), layer.gap * (layer.group - 1)
        t0 = timing.uniform(0, min(period, max(0.0, seconds - layer.dur - span)))
        while t0 < seconds:
            for k in range(layer.group):
                a = int((t0 + k * layer.gap) * SAMPLE_RATE)
                b = max(a, min(n, a + m))
                env[a:b] = torch.maximum(env[a:b], shape[: b - a])
                note = 2 ** (rng.choice(_PENTATONIC) / 12) if layer.notes else 1.0
                f0[a:b] = layer.lo * pitch * note * glide[: b - a]
            t0 += period * ((1 - layer.jit) + layer.jit * timing.expovariate(1.0)) + span
    if layer.vib[0]:
        f0 = f0 * (1 + layer.vib[1] * torch.sin(2 * math.pi * layer.vib[0] * t + rng.uniform(0, 6.28)))
    if layer.src == "noise":
        x = _band_noise(n, layer.lo * pitch, min(layer.hi * pitch, 20_000), tilt, g)
    else:
        partials = _BELL if layer.src == "bell" else [(k, 1 / k) for k in range(1, int(layer.hi) + 1)]
        phase = (2 * math.pi * torch.cumsum(f0.double(), 0) / SAMPLE_RATE).remainder(2 * math.pi).float()
        top = float(f0.max())
        x = sum(amp * (r * layer.lo * pitch / 1000) ** tilt * torch.sin(r * phase + rng.uniform(0, 6.28))
                for r, amp in partials if r * top < 18_000)  # drop partials that would alias
    if layer.am[0] > 0:
        env = env * (1 - layer.am[1] * (0.5 - 0.5 * torch.cos(2 * math.pi * layer.am[0] * t)))
    elif layer.am[0] < 0:
        env = env * (1 - layer.am[1] * torch.sigmoid(2 * _band_noise(n, 0.01, -layer.am[0], 0.0, g)))
    x = x * env
    return x / x.pow(2).mean().sqrt().clamp(min=1e-8)


class Tool(Protocol):
    """A sound tool: render(sound, voice, rng) -> [S] mono float tensor at 48 kHz. A real text-to-audio or TTS
    model plugs in as a class with this method (`voice` is the tts sound's Voice; map it to one of your speakers):
        class MyTextToAudio:
            def render(self, sound, voice, rng):
                return my_model.generate(sound.text, seconds=sound.duration, seed=rng.getrandbits(32))
        mix = mix_scene(scene, Renderer({"sfx": MyTextToAudio(), "tts": MyTTS()}, seed=0))   # or in make_conversation
    """
    def render(self, sound: Sound, voice: "Voice | None", rng: random.Random) -> torch.Tensor: ...


class ProceduralSFX:
    """The built-in SFX tool: the caption picks a sound class (exact caption, else keyword overlap),
    `rng` varies pitch (+-2 semitones), event rate (x0.8..1.25) and spectral tilt (+-0.15: timbre)."""

    def render(self, sound: Sound, voice, rng: random.Random) -> torch.Tensor:
        cls = SOUND_CLASSES[caption_to_class(sound.text)]
        n = round(sound.duration * SAMPLE_RATE)
        pitch, rate, tilt = 2 ** (rng.uniform(-2, 2) / 12), rng.uniform(0.8, 1.25), rng.uniform(-0.15, 0.15)
        seed = rng.getrandbits(60) * 4
        return sum(layer.gain * synth_layer(layer, n, pitch, rate, tilt, seed + i)
                   for i, layer in enumerate(cls.layers))


def caption_to_class(caption: str) -> str:
    """The sound class a caption asks for: a known paraphrase, else the most keyword hits (ties: table order)."""
    if caption in CAPTION_CLASS:
        return CAPTION_CLASS[caption]
    words = set(re.findall(r"[a-z]+", caption.lower()))
    hits = {name: len(words & set(c.keywords.split() + name.split())) for name, c in SOUND_CLASSES.items()}
    return max(hits, key=hits.get)


# -----------------------------------------------------------------------------
# The TTS tool: a formant synthesiser driven by the transcript (default), or espeak-ng

@dataclass(frozen=True)
class Voice:
    """A speaker's voice; `voice_for` gives every (speaker, gender) the same voice in every turn (paper A.2)."""
    f0: float                  # mean pitch, Hz
    formant_scale: float       # vocal tract: formant frequencies x this (female voices ~1.17)
    rate: float                # speaking rate factor
    variant: int               # espeak-ng voice variant number


def voice_for(speaker: str, gender: str) -> Voice:
    """The voice of a speaker: a deterministic function of (speaker, gender), so it persists across turns
    and changes only if the gender changes."""
    rng = random.Random(f"{speaker.strip().lower()}|{gender}")   # str seeds hash with SHA-512: the same on every run
    if gender == "female":
        return Voice(rng.uniform(175, 240), rng.uniform(1.12, 1.22), rng.uniform(0.9, 1.1), rng.randint(1, 5))
    return Voice(rng.uniform(95, 140), rng.uniform(0.95, 1.05), rng.uniform(0.9, 1.1), rng.randint(1, 7))


# emotion: (pitch factor, speaking-rate factor, pitch range of word accents). Unknown emotions read as neutral.
EMOTIONS = {"neutral": (1.0, 1.0, 0.12), "happy": (1.15, 1.1, 0.3), "excited": (1.25, 1.2, 0.4),
            "sad": (0.88, 0.8, 0.05), "angry": (1.05, 1.15, 0.35), "calm": (0.95, 0.88, 0.08),
            "scared": (1.2, 1.25, 0.2), "surprised": (1.2, 1.0, 0.45)}
# Formant targets (F1, F2, F3 in Hz, adult male; Peterson & Barney style averages) for vowels and sonorants.
_VOWELS = {"a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (390, 1990, 2550), "o": (570, 840, 2410),
           "u": (440, 1020, 2240), "y": (390, 1990, 2550), "ee": (270, 2290, 3010), "ea": (270, 2290, 3010),
           "oo": (300, 870, 2240), "ou": (640, 1190, 2390),
           "ow": (640, 1190, 2390), "ai": (660, 1720, 2410), "ay": (660, 1720, 2410), "oa": (570, 840, 2410)}
_SONORANTS = {"m": (280, 900, 2200), "n": (280, 1700, 2600), "ng": (280, 2300, 2750), "l": (360, 1300, 2700),
              "r": (420, 1300, 1600), "w": (300, 610, 2200)}
_NOISE_BANDS = ((4000, 9000), (2000, 5500), (1000, 8000), (500, 4000))  # Hz: s, sh, f/th, h/breath
# fricatives and plosives: letter(s) -> (index into _NOISE_BANDS, voiced)
_FRICATIVES = {"s": (0, False), "z": (0, True), "sh": (1, False), "ch": (1, False), "j": (1, True), "f": (2, False),
               "v": (2, True), "th": (2, False), "ph": (2, False), "h": (3, False)}
_PLOSIVES = {"p": (3, False), "b": (3, True), "t": (0, False), "d": (0, True), "k": (1, False), "c": (1, False),
             "q": (1, False), "g": (1, True), "x": (0, False)}
_CTRL = 200  # control rate of the formant synthesiser, Hz


def _segments(text: str) -> list[tuple]:
    """Letters -> (seconds, voicing, formants or None = hold, noise band or None, accented) segments; the first
    vowel of each word carries the word's pitch accent."""
    segs, i, text, new_word = [], 0, text.lower(), True
    while i < len(text):
        unit = text[i:i + 2] if text[i:i + 2] in {**_VOWELS, **_SONORANTS, **_FRICATIVES} else text[i]
        i += len(unit)
        if unit in _VOWELS:
            segs.append((0.11, 1.0, _VOWELS[unit], None, new_word))
        elif unit in _SONORANTS:
            segs.append((0.06, 0.5, _SONORANTS[unit], None, False))
        elif unit in _FRICATIVES:
            band, voiced = _FRICATIVES[unit]
            segs.append((0.09, 0.3 * voiced, None, band, False))
        elif unit in _PLOSIVES:                                  # a closure, then the burst
            band, voiced = _PLOSIVES[unit]
            segs += [(0.05, 0.15 * voiced, None, None, False), (0.03, 0.0, None, band, False)]
        elif unit in ",;:.!?" or unit.isspace():
            segs.append((0.3 if unit in ".!?" else 0.18 if unit in ",;:" else 0.05, 0.0, None, None, False))
        new_word = unit.isspace() or (new_word and unit not in _VOWELS)
    return segs


class FormantTTS:
    """The built-in TTS: a deterministic formant synthesiser. Letters give formant and noise targets at
    200 Hz (smoothed for coarticulation); a glottal source of harmonics of a pitch contour (declination,
    word accents, a rise on questions) is shaped by three formant resonances; fricatives and bursts are
    band-passed noise. Emotion sets pitch, range and rate; the voice sets pitch and formant scale."""

    def render(self, sound: Sound, voice: Voice, rng: random.Random) -> torch.Tensor:
        pitch, speed, accent = EMOTIONS.get(sound.emotion, EMOTIONS["neutral"])
        segs = _segments(sound.text) or [(0.3, 0.0, None, None, False)]
        natural = sum(s[0] for s in segs) / (voice.rate * speed)
        stretch = min(1.0, (sound.duration - 0.1) / natural) / (voice.rate * speed)  # always fits the duration
        frames, formant, accents = [], (500, 1500, 2500), []
        for sec, voicing, target, band, accented in segs:
            formant = target or formant
            accents += [len(frames)] * accented
            frames += [(voicing, *formant, *(0.5 * (b == band) for b in range(4)))] * max(
                1, round(sec * stretch * _CTRL))
        c = torch.tensor(frames).T                                          # [8, C]: voicing, F1-3, 4 noise bands
        c = torch.nn.functional.avg_pool1d(c[None], 5, 1, 2, count_include_pad=False)[0]  # 25 ms coarticulation
        C = c.shape[1]
        pos = torch.linspace(0, 1, C)
        f0 = voice.f0 * pitch * (1.1 - 0.2 * pos)                           # declination
        for w in accents:                                                    # word accents: 150 ms bumps
            f0 = f0 * (1 + accent * rng.uniform(0.3, 1.0) * torch.exp(-((torch.arange(C) - w - 10) / 12.0) ** 2))
        if sound.text.rstrip().endswith("?"):
            f0 = f0 * (1 + 0.4 * (pos - 0.8).clamp(min=0) / 0.2)
        n_out, lead = round(sound.duration * SAMPLE_RATE), int(0.05 * SAMPLE_RATE)
        S = min(C * SAMPLE_RATE // _CTRL, n_out - lead)
        up = lambda v, n: torch.nn.functional.interpolate(v.reshape(1, -1, C), size=n, mode="linear",
                                                          align_corners=True)[0]
        # Voiced part at 16 kHz (its harmonics stay below 5 kHz), resampled to 48 kHz afterwards.
        n16 = -(-S // 3)
        phase = (2 * math.pi * torch.cumsum(up(f0, n16)[0].double(), 0) / 16_000).remainder(2 * math.pi).float()
        k = torch.arange(1, int(5000 / float(f0.min())) + 1)[:, None]     # [K, 1] harmonic numbers
        F = c[1:4, None, :] * voice.formant_scale                            # [3, 1, C]
        bw = torch.tensor([90.0, 110.0, 170.0])[:, None, None] * voice.formant_scale
        amp = torch.tensor([1.0, 0.6, 0.3])[:, None, None]
        gain = (amp / (1 + ((k * f0 - F) / (bw / 2)) ** 2)).sum(0) / k.sqrt() * c[0]  # [K, C] formant envelope at k f0
        y = resample((up(gain, n16) * torch.sin(k * phase)).sum(0), 16_000, SAMPLE_RATE)[:S]
        g = torch.Generator().manual_seed(rng.getrandbits(62))
        for b, (lo, hi) in enumerate(_NOISE_BANDS):
            if c[4 + b].max() > 0:
                y += 0.25 * up(c[4 + b], S)[0] * _band_noise(S, lo, hi, 0.0, g)
        return torch.nn.functional.pad(y, (lead, n_out - lead - S))


class EspeakTTS:
    """espeak-ng as the TTS tool (`--tts espeak`): voice variant by speaker, pitch and rate by emotion."""

    def __init__(self, binary: str = "espeak-ng"):
        self.binary = shutil.which(binary)
        if self.binary is None:
            raise RuntimeError(f"{binary} not found on PATH; install it (e.g. `apt-get install espeak-ng`) or use "
                               f"--tts builtin")

    def render(self, sound: Sound, voice: Voice, rng: random.Random) -> torch.Tensor:
        pitch, speed, _ = EMOTIONS.get(sound.emotion, EMOTIONS["neutral"])
        variant = f"{'f' if sound.gender == 'female' else 'm'}{voice.variant}"
        cmd = [self.binary, "-v", f"en-us+{variant}", "-s", str(round(165 * voice.rate * speed)),
               "-p", str(max(0, min(99, round(50 * pitch)))), "--stdout", sound.text]
        wav = subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout
        data, sr = sf.read(io.BytesIO(wav), dtype="float32")
        return resample(torch.from_numpy(data), sr, SAMPLE_RATE)


# -----------------------------------------------------------------------------
# Rendering with a cache (paper A.2), loudness (ITU-R BS.1770-4) and the mixer

class Renderer:
    """Renders sounds with pluggable tools, caching by tool parameters: a sound is rendered again only
    when its caption/transcript, voice or length changes, never for loudness, panning or start time.
    One Renderer per conversation (its caches grow with the conversation's sounds)."""

    def __init__(self, tools: dict[str, Tool] | None = None, seed: int | str = 0):
        self.tools = tools if tools is not None else {"sfx": ProceduralSFX(), "tts": FormantTTS()}
        self.seed = seed               # with the tool parameters, fixes every render (deterministic data)
        self.cache: dict[tuple, torch.Tensor] = {}   # tool params -> [S] render
        self.levelled: dict[tuple, tuple] = {}   # mix_scene's levelled sounds (offset, [S'] samples, loudness)
        self.renders = 0               # how many times a tool was actually called

    def render(self, sound: Sound) -> torch.Tensor:
        """[round(duration * 48000)] mono waveform of `sound` (trimmed or zero-padded to its duration)."""
        key = sound.tool_params()
        if key not in self.cache:
            if sound.tool not in self.tools:
                raise ValueError(f"sound {sound.id}: no tool {sound.tool!r} (have {sorted(self.tools)})")
            voice = voice_for(sound.speaker or "", sound.gender or "") if sound.tool == "tts" else None
            x = self.tools[sound.tool].render(sound, voice, random.Random(f"{self.seed}|{key}")).float().squeeze()
            if x.dim() != 1 or not torch.isfinite(x).all():
                raise ValueError(f"tool {sound.tool!r} returned shape {tuple(x.shape)} (finite: "
                                 f"{bool(torch.isfinite(x).all())}) "
                                 f"for sound {sound.id}; a tool must return a finite mono [S] tensor at 48 kHz")
            n = round(sound.duration * SAMPLE_RATE)
            self.cache[key] = torch.nn.functional.pad(x[:n], (0, max(0, n - len(x))))
            self.renders += 1
        return self.cache[key]


# K-weighting at 48 kHz, BS.1770-4 Tables 1 and 2: (b, a) of the shelving pre-filter and the RLB high-pass.
_K_WEIGHTING = (((1.53512485958697, -2.69169618940638, 1.19839281085285), (1.0, -1.69065929318241, 0.73248077421585)),
                ((1.0, -2.0, 1.0), (1.0, -1.99004745483398, 0.99007225036621)))


@functools.lru_cache(maxsize=8)
def _k_response(n: int) -> torch.Tensor:
    """[n // 2 + 1] complex response of the two K-weighting biquads on the grid of an n-point rfft."""
    z = torch.exp(-1j * torch.linspace(0, math.pi, n // 2 + 1, dtype=torch.float64))  # z^-1
    return math.prod((b[0] + b[1] * z + b[2] * z * z) / (a[0] + a[1] * z + a[2] * z * z) for b, a in _K_WEIGHTING)


def k_weight(x: torch.Tensor) -> torch.Tensor:
    """[C, S] -> [C, S] K-weighted (48 kHz). The two biquads are applied through their frequency response on
    an FFT grid padded by 16384 samples, where the filters' impulse response has decayed below 1e-25,
    so this equals direct IIR filtering to float precision (and runs fast without scipy)."""
    S = x.shape[-1]
    n = 1 << (S + 16384 - 1).bit_length()
    return torch.fft.irfft(torch.fft.rfft(x.double(), n) * _k_response(n), n)[..., :S]


def integrated_loudness(x: torch.Tensor) -> float:
    """Integrated loudness in LUFS of [C, S] (or [S]) at 48 kHz, ITU-R BS.1770-4: K-weighting, mean square
    in 400 ms blocks with 75 % overlap, channels summed with weight 1 (L, R), absolute gate -70 LUFS,
    relative gate -10 LU. A sound shorter than 0.5 s is tiled to 0.5 s first and the result is floored at
    -70 LUFS (Scaper's rule), so every sound, however short, has a loudness."""
    if x.shape[-1] == 0:
        return -70.0
    x = x.reshape(-1, x.shape[-1]).double()
    if x.shape[-1] < SAMPLE_RATE // 2:
        x = x.repeat(1, -(-(SAMPLE_RATE // 2) // x.shape[-1]))
    block, step = int(0.4 * SAMPLE_RATE), int(0.1 * SAMPLE_RATE)
    power = k_weight(x).pow(2).unfold(-1, block, step).mean(-1).sum(0)   # [J] sum over channels of block mean squares
    keep = power > 10 ** ((-70 + 0.691) / 10)                            # absolute gate: block loudness > -70 LUFS
    if not keep.any():
        return -70.0
    keep &= power > power[keep].mean() / 10                              # relative gate: 10 LU below the gated mean
    return max(-70.0, -0.691 + 10 * math.log10(float(power[keep].mean())))


def pan_gains(panning: float) -> tuple[float, float]:
    """Constant-power panning: L = cos((p + 1) pi / 4), R = sin((p + 1) pi / 4), so L^2 + R^2 = 1. BS.1770
    sums the channels' K-weighted power, hence a panned sound keeps the loudness of its mono signal."""
    theta = (panning + 1) * math.pi / 4
    return math.cos(theta), math.sin(theta)


FADE = 0.01            # s, raised-cosine fade in and out of every placed sound (no clicks at the edges)
SOUND_CEILING = 0.89   # -1 dBFS: a sound whose peak would exceed this at its loudness goes through the limiter
MIX_CEILING = 0.99     # clip policy: the summed mix goes through the same limiter at this ceiling
ACTIVITY_DB = 30.0     # a 40 Hz frame is active when the sound's energy there is within this many dB of its peak


def limiter_gain(x: torch.Tensor, ceiling: float, block: int = 240) -> torch.Tensor:
    """[S] gain in (0, 1] that keeps [S] or [C, S] `x` within +-ceiling, one gain for all channels (the stereo
    image stays put). Per 5 ms block the gain min(1, ceiling / block peak) is taken, then the minimum with
    both neighbour blocks, then interpolated linearly between block centres: a sample's gain lies between
    the gains of its own block and a neighbour, both at most its own block's need, so no sample overshoots."""
    S = x.shape[-1]
    peak = torch.nn.functional.pad(x.abs().reshape(-1, S).amax(0), (0, -S % block)).view(-1, block).amax(1)
    need = (ceiling / peak.clamp(min=1e-12)).clamp(max=1.0)
    need = -torch.nn.functional.max_pool1d(-need[None, None], 3, 1, 1)[0, 0]
    t = (torch.arange(S) + 0.5) / block - 0.5                      # sample position in block-centre units
    i = t.floor().long().clamp(0, len(need) - 1)
    j, w = (i + 1).clamp(max=len(need) - 1), (t - t.floor()).clamp(0, 1)
    return need[i] * (1 - w) + need[j] * w


def limit_peaks(x: torch.Tensor, ceiling: float) -> torch.Tensor:
    """[S] or [C, S] through the look-ahead peak limiter (limiter_gain); the clamp only absorbs float rounding."""
    return (x * limiter_gain(x, ceiling)).clamp(-ceiling, ceiling)


def set_loudness(x: torch.Tensor, lufs: float) -> tuple[torch.Tensor, float]:
    """([S] scaled to `lufs` integrated loudness, the loudness it reaches). When scaling would peak above -1 dBFS,
    the sound goes through limit_peaks and the gain is refined by the secant method until it measures `lufs`
    (0.05 LU, 5 rounds): a knock asked to be -10 dB still is. What a sparse sound cannot reach is returned."""
    now = integrated_loudness(x)
    if now <= -70:
        return x * 0, -70.0
    g = lufs - now                                                 # dB, the gain without limiting
    y = x * 10 ** (g / 20)
    if float(y.abs().max()) <= SOUND_CEILING:
        return y, lufs
    g_prev = err_prev = None
    for _ in range(5):
        y = limit_peaks(x * 10 ** (g / 20), SOUND_CEILING)
        err = lufs - integrated_loudness(y)
        if abs(err) < 0.05 or (err_prev is not None and abs(err_prev - err) < 0.01):  # done, or saturated
            break
        slope = (err_prev - err) / (g - g_prev) if g_prev is not None else 1.0
        g_prev, err_prev = g, err
        g += min(20.0, err / max(slope, 0.05))
    return y, lufs - err


@dataclass
class Mix:
    audio: torch.Tensor                              # [2, num_frames * 1200] float32 at 48 kHz
    activity: dict[int, list[tuple[float, float]]]   # sound id -> active intervals, s, on the 40 Hz frame grid
    limited_db: float                                # deepest gain reduction of the mix limiter, dB (0: no clipping)
    level_error: float                               # dB, largest |reached - asked| loudness of a sound


def mix_scene(scene: Scene, renderer: Renderer) -> Mix:
    """Render, level, pan and place every sound of `scene` into a 48 kHz stereo mix. Each sound is faded (10 ms),
    placed at start_time in a silent scene and set to `loudness` LUFS there (set_loudness), so the label is its
    integrated loudness in the mix; then panned with the constant-power law and added. Clip policy: the sum goes
    through the peak limiter at 0.99, one gain for both channels (the reduction is returned as limited_db).
    Activity, the FLAM metrics' ground truth: the 40 Hz frames inside the placement where the sound's own energy is
    within 30 dB of its loudest frame (a knock's gaps are inactive), gaps up to 100 ms bridged."""
    F = scene.num_frames
    out = torch.zeros(2, F * HOP)
    activity, shortfall = {}, 0.0
    for s in scene.sounds:
        key = (s.tool_params(), s.loudness, s.start_time, F)
        if key not in renderer.levelled:  # a panning edit reuses the levelled sound
            x = renderer.render(s).clone()
            m = min(len(x), int(FADE * SAMPLE_RATE) + 1)
            fade = 0.5 - 0.5 * torch.cos(math.pi * torch.arange(m) / m)
            x[:m] *= fade
            x[len(x) - m:] *= fade.flip(0)
            # Level the sound with the silence around it that BS.1770's 400 ms blocks (on a 100 ms grid) see in the
            # mix; blocks further away are silent there and fall below the absolute gate, so they change nothing.
            a = round(s.start_time * SAMPLE_RATE)
            lo = max(0, a - 19_200) // 4800 * 4800
            window = torch.nn.functional.pad(x, (a - lo, max(0, min(19_200, F * HOP - a - len(x)))))
            renderer.levelled[key] = (lo, *set_loudness(window, s.loudness))
        lo, y, reached = renderer.levelled[key]
        placed = torch.zeros(F * HOP)
        placed[lo:lo + len(y)] = y[:F * HOP - lo]
        shortfall = max(shortfall, abs(reached - s.loudness))
        left, right = pan_gains(s.panning)
        out += torch.stack([left * placed, right * placed])
        energy = 10 * torch.log10(placed.view(F, HOP).pow(2).mean(1) + 1e-20)  # [F] dB per frame
        active = ((energy > energy.max() - ACTIVITY_DB) & (energy > -100)).tolist()
        runs = []                                                               # [start, end) frames of active runs
        for f in (f for f, on in enumerate(active) if on):
            if runs and f - runs[-1][1] <= 4:
                runs[-1][1] = f + 1
            else:
                runs.append([f, f + 1])
        activity[s.id] = [(i / FRAME_RATE, j / FRAME_RATE) for i, j in runs]
    gain = limiter_gain(out, MIX_CEILING)
    limited_db = round(20 * math.log10(float(gain.min())), 2)
    return Mix((out * gain).clamp(-MIX_CEILING, MIX_CEILING), activity, limited_db, round(shortfall, 2))


# -----------------------------------------------------------------------------
# The offline designer: a simulated user and sound designer (the default backend, used by the toy scale)

# Seeds: the paper seeds AudioCopilot with LibriSpeech and Common Voice transcripts (A.0); these short
# sentences are our own. Evaluation seeds are disjoint from training seeds, as test-clean is in the paper.
TRAIN_SEEDS = (
    "The rain had not stopped for three days.", "She opened the door and the dog ran out into the yard.",
    "Far away, the church bells rang for the wedding.", "The old clock in the hall struck midnight.",
    "We sat by the fire and listened to the wind.", "A storm was coming over the hills.",
    "The market was full of people and noise.", "He walked slowly along the river.",
    "Birds sang in the garden at dawn.", "The ship left the harbour before sunrise.",
    "Somebody knocked twice on the door.", "The city never sleeps, even at night.",
    "She typed the letter as fast as she could.", "The helicopter circled above the accident.",
    "A cat slept on the warm kitchen floor.", "The horse pulled the carriage through the village.",
    "An owl called somewhere in the dark woods.", "Crickets filled the warm summer evening.",
    "The waves broke gently on the beach.", "An ambulance raced down the busy street.",
    "The engine would not start in the cold.", "The phone rang in the empty office.",
    "A quiet room, a humming fan and a long afternoon.", "The piano played softly in the hall.",
    "Thunder rolled over the dark fields.", "Footsteps echoed in the long corridor.",
)
EVAL_SEEDS = (
    "Snow fell quietly on the mountain village.", "The fishermen pulled their boat onto the shore.",
    "A dog barked when the stranger walked past the farm.", "Rain tapped on the window of the study.",
    "The café was warm and full of voices.", "At night the forest was never really silent.",
    "The clock ticked while she waited for the call.", "Lightning lit up the old house on the hill.",
    "They camped by the river and lit a fire.", "The station was crowded before the last train.",
)
LINES = ("Did you hear that?", "We should go inside before it gets worse.", "Come here, quickly!",
         "I think someone is at the door.", "It's so peaceful here.", "Where did everyone go?",
         "Listen, it's starting again.", "I told you we would be late.", "This is the best day ever!",
         "Please, don't leave me here.", "Stay close to me.", "What a beautiful morning.", "Get out of here!",
         "I can't believe it worked.", "Let's wait a little longer.", "Who's there?")
SPEAKERS = (("Anna", "female"), ("Ben", "male"), ("Clara", "female"), ("David", "male"), ("Elena", "female"),
            ("Frank", "male"), ("Grace", "female"), ("Hugo", "male"), ("the narrator", "male"),
            ("the old woman", "female"))
# The simulated user's phrasings, one tuple per turn kind ({x}: a sound's name, {y}: a caption).
STORY = ("Create a soundscape with {list}.", "I'd like to hear {list}.", "Make an audio scene with {list}.",
         "Give me {list}.", "Can you make a scene where there is {list}?", "Sound design for this: {list}.",
         "Compose a short audio story: {list}.", "Create a soundscape inspired by this: \"{seed}\"",
         "Sound-design this moment: {seed}", "{seed} Make it sound like that.",
         "Turn this line into a short audio story: {seed}")
ADD = ("Add {x}{where}{when}.", "Can you add {x}{where}{when}?", "Put in {x}{where}{when}.",
       "I want to hear {x}{where}{when}.", "Let's also have {x}{where}{when}.", "Bring in {x}{where}{when}.",
       "Include {x}{where}{when}, please.")
REMOVE = ("Remove the {x}.", "Get rid of the {x}.", "Take out the {x}.", "I don't want the {x} anymore.",
          "Please delete the {x}.", "Lose the {x}.", "Can you drop the {x}?", "Mute the {x} completely, take it out.")
CHANGE = ("Replace the {x} with {y}.", "Swap the {x} for {y}.", "Instead of the {x}, I want {y}.",
          "Change the {x} to {y}.", "Turn the {x} into {y}.", "Could the {x} be {y} instead?")
VOLUME = ("Make the {x} {more}.", "Can you make the {x} {more}?", "The {x} should be {more}.",
          "I'd like the {x} {more}.", "Mix the {x} {more}, please.", "Could the {x} be {more}?",
          "Bring the {x} in {more}.")
PAN = ("Move the {x} {p}.", "Pan the {x} {p}.", "Place the {x} {p}.", "Could you put the {x} {p}?",
       "I want the {x} {p}.", "Shift the {x} {p}.")
SIDES = (("to the left", -0.8, -0.5), ("to the right", 0.5, 0.8), ("hard left", -1.0, -1.0), ("hard right", 1.0, 1.0),
         ("to the centre", 0.0, 0.0), ("slightly to the left", -0.3, -0.2), ("slightly to the right", 0.2, 0.3))
OPEN = {"busier": ("Make it busier.", "The scene feels empty, fill it up.", "Add more life to the scene.",
                   "Make it feel more lively."),
        "calmer": ("Make it calmer.", "Tone everything down a little.", "It's too hectic, make it more relaxed.",
                   "Make the foreground softer."),
        "wider": ("Make it sound wider.", "Spread the sounds out in the stereo field.", "Give the scene more space.",
                  "Open up the stereo image."),
        "later": ("Let the events start a bit later.", "Give it a slower build-up.",
                  "Delay the foreground sounds by a second."),
        "shorter": ("Make the sounds shorter.", "Tighten everything up, the sounds go on too long.",
                    "Keep the foreground sounds brief.")}


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass
class Simulation:
    """The state of one simulated conversation, passed to every step of the offline designer."""
    rng: random.Random        # everything random in the conversation comes from here (deterministic data)
    matched: list[str]        # sound classes whose keywords the seed sentence contains
    speech: bool              # the SFX + TTS prompt (paper A.2), else SFX only
    next_id: int = 0          # ids are never reused within a conversation

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def _new_sfx(sim: Simulation, exclude: set[str], bed: bool = False) -> tuple[str, str]:
    """(class, caption) of a new sfx: a seed-matched class when there is one (60 %), else any class."""
    pool = [n for n, c in SOUND_CLASSES.items() if n not in exclude and (c.bed or not bed)]
    matched = [n for n in sim.matched if n in pool]
    name = sim.rng.choice(matched if matched and sim.rng.random() < 0.6 else pool)
    return name, sim.rng.choice(SOUND_CLASSES[name].captions)


def _sound(sim: Simulation, tool: str, text: str, length: float, **kw) -> Sound:
    """A new sound with a fresh id, placed within `length` s."""
    rng, i = sim.rng, sim.new_id()
    if tool == "tts":
        duration = min(length, round(0.4 * len(text.split()) + 0.8, 1))
        loud, pan = rng.randint(-18, -10), round(rng.uniform(-0.5, 0.5), 1)
    else:
        cls = SOUND_CLASSES[caption_to_class(text)]
        longest = min(length, 5.0 if cls.layers[0].rate == 0 else 4.0)   # continuous sounds may last longer
        duration = round(rng.uniform(min(1.0, longest), longest), 1)
        loud, pan = rng.randint(int(max(-30, cls.top - 10)), int(cls.top)), round(rng.uniform(-0.9, 0.9), 1)
    start = round(rng.uniform(0, max(0.0, min(MAX_START, length - duration))), 1)
    return Sound(i, tool, text, **dict(loudness=loud, panning=pan, start_time=start, duration=duration) | kw)


def _speech(sim: Simulation, sounds: list[Sound], length: float, speaker: tuple[str, str] | None = None) -> Sound:
    """A new line of speech within `length` s; it follows the last line in `sounds` when it fits (turn taking)."""
    name, gender = speaker or sim.rng.choice(SPEAKERS)
    s = _sound(sim, "tts", sim.rng.choice(LINES), length, speaker=name, gender=gender,
               emotion=sim.rng.choice(tuple(EMOTIONS)))
    ends = [t.end for t in sounds if t.tool == "tts"]
    after = round(max(ends, default=0.0) + 0.3, 1)
    return replace(s, start_time=after) if ends and after <= MAX_START and after + s.duration <= length else s


def _scene(sounds: list[Sound], previous: Scene | None = None) -> Scene:
    """The designer's scene: a description naming every sound, and the edit lists of scene_diff."""
    parts = [f"{s.speaker} saying \"{s.text}\"" if s.tool == "tts" else s.text for s in sounds]
    description = parts[0][0].upper() + parts[0][1:] + (", with " + _join(parts[1:]) if len(parts) > 1 else "") + "."
    return Scene(description, sounds, **scene_diff(previous, Scene(description, sounds)))


def _name(sim: Simulation, s: Sound) -> str:
    """How the user refers to a sound: its class, its caption, or the speaker's voice (after "the")."""
    if s.tool == "tts":
        return sim.rng.choice((f"voice of {s.speaker}", f"line from {s.speaker}", f"speech of {s.speaker}"))
    short = s.text.removeprefix("a ").removeprefix("an ").removeprefix("the ")
    return sim.rng.choice((caption_to_class(s.text), short))


def _story(sim: Simulation, seed_text: str, min_sounds: int, max_sounds: int) -> tuple[str, str, Scene]:
    rng = sim.rng
    length = rng.choice((5.0, 6.0, 7.0, 8.0, 8.0, 8.0))
    bed, caption = _new_sfx(sim, set(), bed=True)
    sounds = [_sound(sim, "sfx", caption, length, start_time=0.0, duration=length,
                     panning=rng.choice((-0.1, 0.0, 0.0, 0.1)),
                     loudness=rng.randint(-30, int(min(-20, SOUND_CLASSES[bed].top))))]
    used = {bed}
    speakers = rng.sample(SPEAKERS, rng.randint(1, 2)) if sim.speech else []
    for k in range(rng.randint(min_sounds - 1, max_sounds - 1)):
        if k < len(speakers):
            sounds.append(_speech(sim, sounds, length, speakers[k]))
        else:
            name, caption = _new_sfx(sim, used)
            used.add(name)
            sounds.append(_sound(sim, "sfx", caption, length))
    parts = [f"{s.speaker} saying \"{s.text}\" in a {s.emotion} voice" if s.tool == "tts" else s.text for s in sounds]
    rng.shuffle(parts)
    template = rng.choice(STORY)
    return template.format(list=_join(parts), seed=seed_text), "story", _scene(sounds)


# The six edit kinds: each returns (instruction, the new scene's sounds), or None when the scene does not allow it.

def _add(sim: Simulation, scene: Scene):
    if len(scene.sounds) >= 7:
        return None
    rng, kw, where, when = sim.rng, {}, "", ""
    if rng.random() < 0.5:
        side, lo, hi = rng.choice(SIDES)
        where = " " + side.replace("to the ", "on the ").replace("centre", "middle")
        kw["panning"] = round(rng.uniform(lo, hi), 1)
    if rng.random() < 0.4:
        kw["start_time"] = float(rng.randint(0, 3))
        when = (" at the start", " after one second", " after two seconds", " after three seconds")[
            int(kw["start_time"])]
    length = scene.duration - kw.get("start_time", 0.0)             # so the new sound ends within the scene
    if sim.speech and rng.random() < 0.4:
        s = _speech(sim, scene.sounds, length)
        x = f"{s.speaker} saying \"{s.text}\" in a {s.emotion} voice"
    else:
        _, x = _new_sfx(sim, {caption_to_class(s.text) for s in scene.sounds if s.tool == "sfx"})
        s = _sound(sim, "sfx", x, length)
    return rng.choice(ADD).format(x=x, where=where, when=when), scene.sounds + [replace(s, **kw)]


def _remove(sim: Simulation, scene: Scene):
    if len(scene.sounds) < 3:
        return None
    keep = ambience_ids(scene)[:1]                                   # one ambience stays
    gone = sim.rng.choice([s for s in scene.sounds if s.id not in keep])
    return sim.rng.choice(REMOVE).format(x=_name(sim, gone)), [s for s in scene.sounds if s.id != gone.id]


def _change(sim: Simulation, scene: Scene):
    """A new caption, emotion or gender: a new sound under a new id (the paper's remove + add)."""
    rng, old = sim.rng, sim.rng.choice(scene.sounds)
    if old.tool == "tts" and rng.random() < 0.5:
        emotion = rng.choice([e for e in EMOTIONS if e != old.emotion])
        new, instruction = replace(old, emotion=emotion), f"Make {old.speaker} sound {emotion} instead."
    elif old.tool == "tts":
        gender = "female" if old.gender == "male" else "male"
        new, instruction = replace(old, gender=gender), f"Give {old.speaker} a {gender} voice."
    else:
        used = {caption_to_class(s.text) for s in scene.sounds if s.tool == "sfx"}
        name, caption = _new_sfx(sim, used, bed=old.id in ambience_ids(scene))
        new = replace(old, text=caption, loudness=min(old.loudness, SOUND_CLASSES[name].top))
        instruction = rng.choice(CHANGE).format(x=_name(sim, old), y=caption)
    new = replace(new, id=sim.new_id())
    return instruction, [new if s.id == old.id else s for s in scene.sounds]


def _volume(sim: Simulation, scene: Scene):
    rng, options = sim.rng, []
    for s in scene.sounds:
        top = -10 if s.tool == "tts" else SOUND_CLASSES[caption_to_class(s.text)].top
        options += [(s, d) for d in (rng.randint(4, 8), -rng.randint(4, 8)) if -30 <= s.loudness + d <= top]
    if not options:
        return None
    s, d = rng.choice(options)
    more = rng.choice(("", "a bit ") if abs(d) < 6 else ("much ", "a lot ")) + ("louder" if d > 0 else "quieter")
    instruction = rng.choice(VOLUME).format(x=_name(sim, s), more=more)
    return instruction, [replace(x, loudness=x.loudness + d) if x is s else x for x in scene.sounds]


def _pan(sim: Simulation, scene: Scene):
    keep = ambience_ids(scene)[:1]                                   # one ambience stays centred
    s = sim.rng.choice([s for s in scene.sounds if s.id not in keep])
    side, lo, hi = sim.rng.choice([x for x in SIDES if min(abs(s.panning - x[1]), abs(s.panning - x[2])) >= 0.3])
    instruction = sim.rng.choice(PAN).format(x=_name(sim, s), p=side)
    return instruction, [replace(x, panning=round(sim.rng.uniform(lo, hi), 1)) if x is s else x for x in scene.sounds]


def _open(sim: Simulation, scene: Scene):
    """An open-ended edit of the whole scene: busier (two new sounds), or one change to every foreground
    sound: calmer (-6 dB), wider (panned 0.4 outwards), later (+1 s) or shorter (x0.6, speech excepted)."""
    amb = ambience_ids(scene)[:1]
    fits = lambda s: s.start_time + 1 <= MAX_START and s.end + 1 <= scene.duration
    ops = {"calmer": lambda s: replace(s, loudness=max(-30, s.loudness - 6)),
           "wider": lambda s: replace(s, panning=max(-1.0, min(1.0, s.panning + math.copysign(0.4, s.panning)))),
           "later": lambda s: replace(s, start_time=s.start_time + 1) if fits(s) else s,
           "shorter": lambda s: replace(s, duration=max(0.5, round(s.duration * 0.6, 1))) if s.tool == "sfx" else s}
    edits = {op: [f(s) if s.id not in amb else s for s in scene.sounds] for op, f in ops.items()}
    options = [op for op, sounds in edits.items() if sounds != scene.sounds] + ["busier"] * (len(scene.sounds) <= 5)
    op = sim.rng.choice(options)
    if op == "busier":
        edits[op] = _add(sim, replace(scene, sounds=_add(sim, scene)[1]))[1]
    return sim.rng.choice(OPEN[op]), edits[op]


EDITS = {"open": _open, "add": _add, "remove": _remove, "change": _change, "volume": _volume, "pan": _pan}


class OfflineCopilot:
    """Procedural user and designer. conversation() returns [(instruction, kind, scene)]: a storytelling turn
    (2-6 sounds, one ambience), then edits of the six kinds; seed words pick sound classes by keyword, and
    everything else comes from `rng`, so a conversation is a pure function of (seed text, rng state)."""
    failures = 0   # invalid answers: the procedural designer writes valid scenes by construction (asserted)

    def conversation(self, seed_text: str, rng: random.Random, n_turns: int = 3, kinds: list[str] | None = None,
                     speech: bool | None = None) -> list[tuple[str, str, Scene]]:
        words = set(re.findall(r"[a-z]+", seed_text.lower()))
        matched = [n for n, c in SOUND_CLASSES.items() if words & set(c.keywords.split())]
        sim = Simulation(rng, matched, rng.random() < 0.35 if speech is None else speech)  # paper A.2: SFX(+TTS)
        turns = [_story(sim, seed_text, *((3, 4) if kinds else (2, 6)))]   # eval: room for any two edits
        for t in range(1, n_turns):
            previous = turns[-1][2]
            options = [kinds[t - 1]] if kinds else rng.sample(EDIT_KINDS, len(EDIT_KINDS))
            edit = next(((k, e) for k in options if (e := EDITS[k](sim, previous))), None)
            if edit is None:
                raise RuntimeError(f"no feasible {options} edit for scene {scene_to_json(previous)}")
            kind, (instruction, sounds) = edit
            scene = _scene(sounds, previous)
            errors = validate_scene(scene, previous)
            assert not errors and kind in ("open", classify_edit(previous, scene)), (kind, errors, instruction)
            turns.append((instruction, kind, scene))
        return turns

    def t2a(self, rng: random.Random) -> list[tuple[str, str, Scene]]:
        """A single-sound conversation for the text-to-audio and captioning tasks: the caption is the prompt."""
        cls = SOUND_CLASSES[rng.choice(sorted(SOUND_CLASSES))]
        caption = rng.choice(cls.captions)
        sound = Sound(0, "sfx", caption, rng.randint(int(max(-30, cls.top - 8)), int(cls.top)), 0.0, 0.0,
                      rng.choice((3, 4, 5, 6, 8)))
        return [(caption, "t2a", Scene(caption[0].upper() + caption[1:] + ".", [sound]))]


# -----------------------------------------------------------------------------
# The LLM designer: any OpenAI-compatible chat server (vLLM serving Gemma 3 27B in the paper, A.1)

class CopilotError(RuntimeError):
    """The LLM server failed, or its answers stayed invalid after every attempt."""


def _prompt(tts: bool) -> str:
    """The AudioCopilot system prompt. Without tts it is the paper's Figure 8 word for word (its "Example output"
    filled with the Figs. 9-10 example). The SFX + TTS prompt is not printed in the paper: it is reconstructed
    here in the same words, adding the tts tool and its speaker/gender/emotion fields."""
    sfx = ("- **sfx**: used to create non-speech sound effects, including music or ambience. You will provide the "
           "text caption of the sound to be generated.")
    tools = ("two tools:\n\n" + sfx + "\n- **tts**: used to create speech. You will provide the transcript of the "
             "speech, the name of the speaker, their gender and the emotion of the delivery." if tts else
             "one sound effects tool:\n\n" + sfx)
    fields = ("tool:\n- which tool should be used (sfx or tts)\n\ntext:\n- the audio caption for SFX, or the "
              "transcript for TTS\n\nspeaker (TTS only):\n- the name of the character speaking; use the same name "
              "whenever the same character speaks again\n\ngender (TTS only):\n- male or female\n\nemotion (TTS "
              "only):\n- the emotion of the delivery, e.g. neutral, happy, sad, angry, excited, calm, scared or "
              "surprised" if tts else "tool:\n- which tool should be used (sfx)\n\ntext:\n- the audio caption for SFX")
    example = "[\n" + ",\n".join(json.dumps(m, ensure_ascii=False) for m in _example(tts)) + "\n]"
    return f"""You are an intelligent AI prompt engineer.

Your job is to simulate interactions between a user and an AI Sound Designer that helps create sound effects. \
The AI sound designer is helping the user generate the information needed for audio editing.

I will give you a single sentence to inspire your simulations, you do not have to follow it closely. Please be \
creative in your interpretation of the inspiration.

Your responses should consist of a JSON code block containing up to 5 interactions between the user and the AI \
sound designer, for a total of 10 messages. Only return a single JSON. Each message from the AI-designer should \
contain up to 10 prompts (one should be ambient), and other parameters for the audio generation.

Before generating the prompt in each turn, include a natural language description of the entire soundscape. \
Don't include any references to loudness or panning in the description.

The AI sound designer has access to {tools}

You will also provide the following information for each prompt:

{fields}

loudness:
- How loud the sound should be in decibels
- Use any float between -30 and -10
- Higher loudness should be used for prominent foreground elements (-12).
- Lower loudness should be used for ambient sounds (e.g -30 dB).

panning:
- How much to pan the sound left or right
- Use any float between -1.0 (hard left) and 1.0 (hard right)
- Ambience should be centered (-0.1 to 0.1)

start_time:
- When the sound should start playing in seconds
- Use 0.0 for ambient sounds and long background elements
- Use different start times (0.0-3.0) to sequence shorter sound effects
- Keep start_time between 0 and 4 seconds
- the maximum start time for any sound is 4 seconds.

duration
- how long the sound should play in seconds
- start_time + duration should be <= 8 seconds for all sounds. THIS IS VERY IMPORTANT.
- ambient sounds should always be present (start_time + duration for all non-ambient sounds should be <= \
ambience duration)

A unique integer id should be assigned to each prompt.

Whenever a sound is removed, add it to a list of removed ids. Whenever a sound is added, add it to a list of \
added ids. Whenever the volume, panning, start time, or duration of a sound is changed, add it to a list of \
changed ids.

Example inspiration: leaves rustle

Example output:
```json
{example}
```"""


def _example(tts: bool) -> list[dict]:
    """The paper's example conversation (Figs. 9-10) in the answer format: user text / system json messages.
    Fig. 10 prints only the added sound "due to lack of space"; as its caption says AudioCopilot always shows
    all sounds, the edit turn lists all four. The third turn, with speech, is ours (the SFX + TTS prompt)."""
    room = [Sound(0, "sfx", "gentle birdsong outside a window", -28, 0.1, 0, 8),
            Sound(1, "sfx", "antique clock ticking softly", -30, -0.1, 0, 8),
            Sound(2, "sfx", "distant, refined chatter", -30, 0, 0, 8)]
    start = "A peaceful, elegant morning soundscape within a luxurious room. Delicate sounds of birdsong"
    first = Scene(start + " and a gentle ticking clock create a serene atmosphere. The faint aroma of fresh flowers "
                  "lingers in the air.", room)
    second = Scene(start + ", a gentle ticking clock, refined chatter, and someone delicately handling a flower create "
                   "a serene atmosphere. The faint aroma of fresh flowers lingers in the air.",
                   room + [Sound(3, "sfx", "delicate flower petals rustling", -22, 0, 1.2, 2.5)], added=[3])
    turns = [("Create a soundscape of a quiet, refined morning in a luxurious room.", first),
             ("I want to emphasize the delicate nature of the flower detail mentioned. Add a sound for someone "
              "delicately handling a flower.", second)]
    if tts:
        butler = Sound(4, "tts", "Your tea is ready, madam.", -16, 0.3, 4.0, 2.5, speaker="the butler", gender="male",
                       emotion="calm")
        third = Scene(second.description + " A butler politely announces that the tea is ready.",
                      second.sounds + [butler], added=[4])
        turns.append(("Have a butler politely announce that the tea is ready.", third))
    return [message for instruction, scene in turns for message in (
        {"role": "user", "content": [{"type": "text", "text": instruction}]},
        {"role": "system", "content": [{"type": "json", **json.loads(scene_to_json(scene))}]})]


_KIND_WORDS = {"open": "an open-ended edit", "add": "adding a sound", "remove": "removing a sound",
               "change": "changing one sound into another", "volume": "adjusting the volume of one sound",
               "pan": "adjusting the panning of one sound"}


def chat_completion(base_url: str, model: str, messages: list[dict], *, temperature: float = 1.0,
                    max_tokens: int = 8192, timeout: float = 300.0, retries: int = 3, backoff: float = 2.0,
                    seed: int | None = None) -> str:
    """POST {base_url}/chat/completions (OpenAI API) and return the answer text. Connection errors, timeouts
    and HTTP 408/429/5xx are retried `retries` times with exponential backoff (backoff * 2**k s); other
    HTTP errors fail at once. The bearer token, if any, comes from the OPENAI_API_KEY environment variable."""
    url = base_url.rstrip("/") + "/chat/completions"
    body = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
    body |= {"seed": seed} if seed is not None else {}
    headers = {"Content-Type": "application/json"}
    headers |= {"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"} if os.environ.get("OPENAI_API_KEY") else {}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            if e.code not in (408, 429, 500, 502, 503, 504) or attempt == retries:
                raise CopilotError(f"{url}: HTTP {e.code} {e.reason}: {e.read()[:300]!r}; check --base-url and "
                                   f"--model") from e
            problem = f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == retries:
                raise CopilotError(f"{url} unreachable after {retries + 1} tries ({e}); is the server running "
                                   f"(e.g. `vllm serve {model}`) and is --base-url right?") from e
            problem = str(e)
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
            raise CopilotError(f"{url}: the answer is not an OpenAI chat completion ({e!r})") from e
        log.warning("%s: %s, retry %d/%d in %.1f s", url, problem, attempt + 1, retries, backoff * 2 ** attempt)
        time.sleep(backoff * 2 ** attempt)


def parse_answer(text: str, n_turns: int | None = None, kinds: list[str] | None = None) -> tuple[list, list[str]]:
    """An LLM answer (a JSON list of up to 10 messages, user / system alternating, Figs. 9-10) ->
    ([(instruction, kind, scene)], rule violations), each scene validated against the previous one and
    each edit against the requested kind. An answer that cannot be read as scenes raises SceneError."""
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)          # prefer the fenced block, if any
    text = fenced.group(1) if fenced else text
    start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
    if start < 0:
        raise SceneError("no JSON found in the answer; return one JSON list of messages")
    try:
        messages, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as e:
        raise SceneError(f"the answer is not valid JSON (character {e.pos}: {e.msg})") from e
    if not isinstance(messages, list) or not messages or len(messages) % 2 or len(messages) > 2 * MAX_TURNS:
        length = len(messages) if isinstance(messages, list) else "-"
        raise SceneError(f"expected a JSON list of 2 to {2 * MAX_TURNS} messages (user and system alternating), "
                         f"got {type(messages).__name__} of length {length}")
    if n_turns is not None and len(messages) != 2 * n_turns:
        raise SceneError(f"expected exactly {n_turns} interactions ({2 * n_turns} messages), got {len(messages)} "
                         f"messages")
    turns, errors, previous = [], [], None
    for t in range(len(messages) // 2):
        user, system = messages[2 * t: 2 * t + 2]
        try:  # the structure; any problem here makes the whole answer unreadable
            if not (isinstance(user, dict) and user.get("role") == "user" and isinstance(system, dict)
                    and system.get("role") in ("system", "assistant")):
                raise SceneError("messages must alternate role \"user\" then role \"system\"")
            instruction = user.get("content")
            if isinstance(instruction, list):  # the paper's form: [{"type": "text", "text": ...}]
                instruction = " ".join(c.get("text", "") for c in instruction
                                       if isinstance(c, dict) and c.get("type") == "text")
            if not isinstance(instruction, str) or not instruction.strip():
                raise SceneError("the user message has no text")
            obj = system.get("content")
            obj = obj[0] if isinstance(obj, list) and obj else obj
            scene = parse_scene(obj)
        except SceneError as e:
            raise SceneError(f"turn {t + 1}: {e}") from e
        errors += [f"turn {t + 1}: {e}" for e in validate_scene(scene, previous)]
        kind = "story" if previous is None else classify_edit(previous, scene)
        asked = kinds[t - 1] if kinds and t else None
        if asked not in (None, "open", kind):
            errors.append(f"turn {t + 1}: the edit should be {_KIND_WORDS[asked]}, but the scene's difference is a "
                          f"{kind} edit")
        turns.append((instruction.strip(), "open" if asked == "open" else kind, scene))
        previous = scene
    return turns, errors


class LLMCopilot:
    """The LLM backend: one chat completion simulates a whole conversation (paper A.2). An invalid answer
    is sent back with its error list and the LLM is asked again, up to `attempts` answers. A conversation
    still invalid after that raises CopilotError and is dropped (counted in `failures`, logged), unless
    `keep_invalid` and its scenes can be rendered: then it is kept, and the dataset stores each turn's
    violations, for the two-stage data of paper A.3 (all data first, then the validated subset)."""

    def __init__(self, base_url: str, model: str, attempts: int = 3, keep_invalid: bool = False, **http):
        self.base_url, self.model, self.attempts, self.keep_invalid = base_url, model, attempts, keep_invalid
        self.http = http
        self.failures = 0              # invalid answers seen (each one was retried, kept flagged, or dropped)

    def conversation(self, seed_text: str, rng: random.Random, n_turns: int = 3, kinds: list[str] | None = None,
                     speech: bool | None = None) -> list[tuple[str, str, Scene]]:
        tts = rng.random() < 0.5 if speech is None else speech   # paper A.2: one of two prompts at random
        request = f"Inspiration: {seed_text}\n\nSimulate exactly {n_turns} interactions."
        if kinds:
            request += " After the first request, the user's edits are, in order: " + "; ".join(
                _KIND_WORDS[k] for k in kinds) + "."
        messages = [{"role": "system", "content": _prompt(tts)}, {"role": "user", "content": request}]
        for attempt in range(self.attempts):
            answer = chat_completion(self.base_url, self.model, messages, seed=rng.getrandbits(31), **self.http)
            try:
                turns, problems = parse_answer(answer, n_turns, kinds)
            except SceneError as e:
                turns, problems = [], [str(e)]
            if not problems:
                return turns
            self.failures += 1
            log.warning("invalid answer for seed %r (attempt %d/%d):\n%s", seed_text, attempt + 1, self.attempts,
                        "\n".join(problems))
            feedback = ("Your JSON breaks these rules:\n" + "\n".join(problems) +
                        "\nReturn the whole corrected JSON list only.")
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": feedback}]
        renderable = all(s.tool in ("sfx", "tts") and s.duration > 0 for *_, sc in turns for s in sc.sounds)
        if self.keep_invalid and turns and renderable:
            log.warning("keeping the invalid conversation for seed %r; its violations are stored with it", seed_text)
            return turns
        raise CopilotError(f"no valid conversation for seed {seed_text!r} after {self.attempts} answers; last "
                           f"problems:\n" + "\n".join(problems))


# -----------------------------------------------------------------------------
# Datasets: python copilot.py --out DIR --n N, read back with read_conversations

@dataclass
class ConversationTurn:
    instruction: str                                 # what the simulated user typed
    kind: str                                        # "story", "t2a", or an edit kind (EDIT_KINDS)
    scene: Scene                                     # the designer's plan (edits carry the previous scene forward)
    audio: Path                                      # the rendered mix, 48 kHz stereo FLAC
    activity: dict[int, list[tuple[float, float]]]   # sound id -> active intervals, s (energy-based, 40 Hz grid)
    limited_db: float = 0.0                          # deepest gain reduction of the mix limiter, dB (0: no clipping)
    level_error: float = 0.0                         # dB, largest |reached - asked| loudness of its sounds
    violations: list[str] = field(default_factory=list)  # validate_scene against the previous turn ([]: valid, A.3)


@dataclass
class Conversation:
    id: str                                          # "{split}-{index:07d}"
    seed_text: str                                   # the sentence that seeded the simulation
    turns: list[ConversationTurn]


@dataclass
class DatasetConfig:
    """What fixes a dataset's content; stored as DIR/config.json and checked when a job resumes."""
    seed: int = 0                  # conversation i of a split depends only on (seed, split, i)
    backend: str = "offline"       # "offline" (procedural designer) or "openai" (an OpenAI-compatible LLM server)
    tts: str = "builtin"           # "builtin" formant synthesiser or "espeak" (espeak-ng must be installed)
    t2a_frac: float = 0.2          # training conversations that are one sound (text-to-audio, captioning; offline)
    max_turns: int = 5             # most turns per training conversation (paper: up to 5, 3 on average)
    shard_size: int = 1000         # conversations per shard directory
    base_url: str = "http://localhost:8000/v1"  # openai backend: the server's base URL
    model: str = "google/gemma-3-27b-it"        # openai backend: the served model name (paper A.1)
    attempts: int = 3              # openai backend: answers per conversation before it is dropped (or kept, flagged)
    keep_invalid: bool = False     # openai backend: keep still-invalid conversations with their violations (A.3)
    timeout: float = 300.0         # openai backend: seconds per HTTP request


TURN_WEIGHTS = (1, 2, 4, 2, 1)     # relative frequency of 1..5 turns in a training conversation


def conversation_path(root: Path, split: str, i: int, shard_size: int) -> Path:
    return Path(root) / split / f"{i // shard_size:05d}" / f"{split}-{i:07d}.json"


def _write_json(path: Path, obj, indent: int | None = None) -> None:
    text = json.dumps(obj, ensure_ascii=False, indent=indent, separators=(",", ": ") if indent else (",", ":"))
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def make_conversation(cfg: DatasetConfig, root: Path, split: str, i: int) -> dict:
    """Simulate, render and write conversation i of `split` (audio first, the JSON last: its presence marks
    completion). Evaluation conversations have 3 turns (storytelling, then two edits; every block of three
    conversations covers the six edit kinds once) and seeds disjoint from training. Returns statistics."""
    path = conversation_path(root, split, i, cfg.shard_size)
    rng = random.Random(f"{cfg.seed}|{split}|{i}")
    seed_text = rng.choice(EVAL_SEEDS if split == "eval" else TRAIN_SEEDS)
    offline = OfflineCopilot()
    copilot = offline if cfg.backend == "offline" else LLMCopilot(cfg.base_url, cfg.model, cfg.attempts,
                                                                  cfg.keep_invalid, timeout=cfg.timeout)
    try:
        if split == "eval":
            kinds = random.Random(f"{cfg.seed}|eval-block|{i // 3}").sample(EDIT_KINDS, 6)[2 * (i % 3): 2 * (i % 3) + 2]
            turns = copilot.conversation(seed_text, rng, 3, kinds)
        elif cfg.backend == "offline" and rng.random() < cfg.t2a_frac:
            turns = offline.t2a(rng)
        else:
            n_turns = rng.choices(range(1, cfg.max_turns + 1), TURN_WEIGHTS[:cfg.max_turns])[0]
            turns = copilot.conversation(seed_text, rng, n_turns)
    except CopilotError as e:
        return {"id": path.stem, "failed": str(e), "invalid_answers": copilot.failures}
    tools = {"sfx": ProceduralSFX(), "tts": EspeakTTS() if cfg.tts == "espeak" else FormantTTS()}
    renderer, records = Renderer(tools, seed=f"{cfg.seed}|{split}|{i}"), []
    for t, (instruction, kind, scene) in enumerate(turns):
        mix = mix_scene(scene, renderer)
        audio = path.with_name(f"{path.stem}-t{t}.flac")
        save_audio(audio, mix.audio)
        records.append({"instruction": instruction, "kind": kind, "scene": scene_to_json(scene), "audio": audio.name,
                        "activity": {str(k): [list(v) for v in iv] for k, iv in mix.activity.items()},
                        "limited_db": mix.limited_db, "level_error": mix.level_error,
                        "violations": validate_scene(scene, turns[t - 1][2] if t else None)})
    _write_json(path, {"id": path.stem, "seed_text": seed_text, "turns": records})
    return {"id": path.stem, "kinds": [r["kind"] for r in records], "invalid_answers": copilot.failures,
            "limited": sum(r["limited_db"] < 0 for r in records)}


def _run_job(job: tuple) -> dict:
    return make_conversation(*job)


def write_dataset(root: str | Path, n: int, eval_n: int = 0, cfg: DatasetConfig | None = None,
                  workers: int = 1) -> dict:
    """Write n training and eval_n evaluation conversations under root/{train,eval}/, skipping finished ones;
    a killed job leaves *.tmp files (removed here) and conversations without their JSON, generated again with
    the same bytes. One torch thread per process, so --workers does not change the bytes. Returns counts."""
    root, cfg = Path(root), cfg or DatasetConfig()
    settings = json.loads(json.dumps(vars(cfg)))
    if (root / "config.json").exists():
        stored = json.loads((root / "config.json").read_text())
        if stored != settings:
            diff = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
            raise ValueError(f"{root} was written with other settings (stored, now): {diff}; "
                             f"resume with the same flags or use a new --out")
    else:
        _write_json(root / "config.json", settings, indent=1)
    for tmp in root.rglob("*.tmp"):
        tmp.unlink()
    jobs = []
    for split, count in (("train", n), ("eval", eval_n)):
        if count:
            (root / split).mkdir(exist_ok=True)
        jobs += [(cfg, root, split, i) for i in range(count)
                 if not conversation_path(root, split, i, cfg.shard_size).exists()]
    stats = {"written": 0, "skipped": n + eval_n - len(jobs), "limited": 0, "failed": 0, "invalid_answers": 0,
             "kinds": {}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with (multiprocessing.get_context("spawn").Pool(workers, torch.set_num_threads, (1,)) if workers > 1
              else contextlib.nullcontext()) as pool:
            results = pool.imap_unordered(_run_job, jobs) if pool else map(_run_job, jobs)
            for r in tqdm(results, total=len(jobs), desc=f"copilot -> {root}", unit="conv"):
                stats["invalid_answers"] += r["invalid_answers"]
                if "failed" in r:
                    stats["failed"] += 1
                    log.error("%s dropped: %s", r["id"], r["failed"])
                    continue
                stats["written"] += 1
                stats["limited"] += r["limited"]
                for k in r["kinds"]:
                    stats["kinds"][k] = stats["kinds"].get(k, 0) + 1
    finally:
        torch.set_num_threads(threads)
    log.info("%s: %s", root, stats)
    return stats


def read_conversation(path: Path) -> Conversation:
    """One conversation file; a malformed file, or one whose audio is missing, is an error naming it."""
    try:
        obj = json.loads(path.read_text())
        turns = [ConversationTurn(
            t["instruction"], t["kind"], parse_scene(t["scene"]), path.parent / t["audio"],
            {int(k): [(float(a), float(b)) for a, b in iv] for k, iv in t["activity"].items()},
            float(t["limited_db"]), float(t["level_error"]), list(t["violations"])) for t in obj["turns"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed conversation file ({type(e).__name__}: {e}); delete it and rerun the "
                         f"copilot.py command that wrote its dataset to regenerate it") from e
    if missing := [t.audio.name for t in turns if not t.audio.is_file()]:
        raise FileNotFoundError(f"{path}: its audio {missing} is missing; delete {path.name} and rerun copilot.py "
                                f"to regenerate it")
    return Conversation(obj["id"], obj["seed_text"], turns)


def read_conversations(root: str | Path, split: str = "train") -> list[Conversation]:
    """Every finished conversation of root/split, in index order, each checked by read_conversation."""
    if not (d := Path(root) / split).is_dir():
        raise FileNotFoundError(f"{d}: no such split; write it with `python copilot.py --out {root} --n N --eval-n M`")
    return [read_conversation(path) for path in sorted(d.glob("*/*.json"))]


# -----------------------------------------------------------------------------
# Command line

def main(argv: list[str] | None = None) -> None:
    d = DatasetConfig()
    p = argparse.ArgumentParser(description="AudioCopilot: simulate AudioChat conversations and render their audio.")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="dataset directory (train/ and eval/ shards, config.json)")
    g.add_argument("--n", type=int, required=True, help="number of training conversations")
    g.add_argument("--eval-n", type=int, default=0, help="held-out evaluation conversations (StoryGen-Eval shape)")
    g.add_argument("--seed", type=int, default=d.seed, help="conversation i depends only on (seed, split, i)")
    g.add_argument("--workers", type=int, default=1, help="parallel processes (the output does not depend on it)")
    g.add_argument("--shard-size", type=int, default=d.shard_size, help="conversations per shard directory")
    g = p.add_argument_group("simulation")
    g.add_argument("--backend", choices=("offline", "openai"), default=d.backend,
                   help="procedural designer, or an OpenAI-compatible LLM server")
    g.add_argument("--t2a-frac", type=float, default=d.t2a_frac, help="share of single-sound training conversations")
    g.add_argument("--max-turns", type=int, default=d.max_turns, choices=range(1, 6), help="most turns a conversation")
    g.add_argument("--tts", choices=("builtin", "espeak"), default=d.tts, help="speech: formant synth or espeak-ng")
    g = p.add_argument_group("openai backend")
    g.add_argument("--base-url", default=d.base_url, help="server base URL (vLLM: http://HOST:8000/v1)")
    g.add_argument("--model", default=d.model, help="served model name")
    g.add_argument("--attempts", type=int, default=d.attempts, help="answers per conversation (errors are fed back)")
    g.add_argument("--timeout", type=float, default=d.timeout, help="seconds per HTTP request")
    g.add_argument("--keep-invalid", action="store_true",
                   help="keep conversations still invalid after --attempts, flagged with their violations (paper A.3)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = DatasetConfig(**{k: getattr(a, k) for k in vars(d)})   # the flags carry DatasetConfig's field names
    print(json.dumps(write_dataset(a.out, a.n, a.eval_n, cfg, a.workers)))


if __name__ == "__main__":
    main()
