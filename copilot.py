"""AudioCopilot: the data simulator behind AudioChat (paper section 3.2 and appendix A, Figs. 8-10).

A simulated user asks for an audio story and edits it; a simulated sound designer answers each turn with a scene, the
JSON plan of every sound; tools render the sounds and the mixer places them in 48 kHz stereo (BS.1770-4 loudness,
constant-power panning, a limiter, activity on a 40 Hz grid: the FLAM labels). Designers: OfflineCopilot, a procedural
user and designer in a toy world of 15 sound classes (text only, no speech), and LLMCopilot, the paper's prompt on any
OpenAI-compatible server. Conversation i of a dataset depends only on (seed, split, i).

    python copilot.py --out data/toy --n 600 --eval-n 60 --workers 2
    python copilot.py --backend openai --base-url http://localhost:8000/v1 --model google/gemma-3-27b-it --n 100000
    python -m pytest -q tests/test_copilot.py
"""
import argparse
import contextlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import urllib.request
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator, NamedTuple

import soundfile as sf
import torch
from tqdm import tqdm

from tokenizer import SAMPLE_RATE, resample, save_audio, write_atomic

log = logging.getLogger("copilot")

# The prompt's rules (paper Fig. 8), shared by the validator and both designers.
MAX_START, MAX_END = 4.0, 8.0     # s: latest start_time; latest start_time + duration
AMBIENCE_PAN = 0.1                # an ambience is centred: |panning| <= 0.1
MAX_SOUNDS, MAX_TURNS = 10, 5     # "up to 10 prompts" per designer message; "up to 5 interactions ... 10 messages"
EDIT_KINDS = ("open", "add", "remove", "change", "volume", "pan")  # StoryGen-Eval's six edit tasks (section 3.3)
GRID = 40                         # Hz: the mixer's activity grid (the FLAM labels); a mix is ceil(duration * 40) * HOP
HOP = SAMPLE_RATE // GRID         # 1200 samples per grid frame


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
    emotion: str | None = None  # tts only: e.g. "happy", "sad", "angry"

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

    def num_frames(self, frame_rate: float) -> int:
        """Frames of the audio span that follows the plan: ceil(latest end time * frame_rate), e.g. the VAE's rate."""
        return math.ceil(round(self.duration * frame_rate, 6))

    def by_id(self) -> dict[int, Sound]:
        return {s.id: s for s in self.sounds}


_SOUND_KEYS = ("tool", "text", "speaker", "gender", "emotion", "loudness", "panning", "start_time", "duration", "id")
_SCENE_KEYS = ("description", "added", "changed", "removed", "text")
_NUMBERS = ("loudness", "panning", "start_time", "duration")


def scene_to_json(scene: Scene) -> str:
    """Canonical compact JSON (paper key order, sounds under "text", 8 not 8.0); what the model reads and writes."""
    sounds = [{k: int(v) if isinstance(v, float) and v.is_integer() else v
               for k, v in ((k, getattr(s, k)) for k in _SOUND_KEYS) if v is not None} for s in scene.sounds]
    obj = {k: getattr(scene, k) for k in _SCENE_KEYS[:4]} | {"text": sounds}
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _first_json(text: str, opens: str):
    """The first JSON value in `text` that opens with a character of `opens`; prose around it is ignored."""
    return json.JSONDecoder().raw_decode(text, min((i for i in map(text.find, opens) if i >= 0), default=len(text)))[0]


def _need(ok, message: str) -> None:
    if not ok:
        raise SceneError(message)


def parse_scene(text: str | dict) -> Scene:
    """A Scene from the first JSON object in `text` or from a decoded object; checks keys and types."""
    try:
        obj = _first_json(text, "{") if isinstance(text, str) else text
    except json.JSONDecodeError as e:
        _need("{" in text, f"no JSON object found in {text[:80]!r}")
        raise SceneError(f"invalid JSON at character {e.pos}: {e.msg}") from e
    _need(isinstance(obj, dict), f"a scene must be a JSON object, got {type(obj).__name__}")
    missing, unknown = set(_SCENE_KEYS) - set(obj), set(obj) - set(_SCENE_KEYS) - {"type"}
    _need(not missing and not unknown, f"scene keys: missing {sorted(missing)}, unknown {sorted(unknown)}; "
                                       f"expected {', '.join(_SCENE_KEYS)}")
    _need(isinstance(obj["description"], str) and isinstance(obj["text"], list),
          "scene: description must be a string and \"text\" the list of sounds")
    for k in ("added", "changed", "removed"):
        _need(isinstance(obj[k], list) and all(type(i) is int for i in obj[k]),
              f"scene: {k} must be a list of integer ids, got {obj[k]!r}")
    for n, d in enumerate(obj["text"]):
        _need(isinstance(d, dict), f"sound #{n}: must be an object")
        where = f"sound #{n} (id {d.get('id')!r})"
        missing, unknown = {"id", "tool", "text", *_NUMBERS} - set(d), set(d) - set(_SOUND_KEYS)
        _need(not missing and not unknown, f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
        for k, v in d.items():
            want, ok = (("an integer", type(v) is int) if k == "id" else ("a string", isinstance(v, str))
                        if k not in _NUMBERS else ("a finite number", type(v) in (int, float) and math.isfinite(v)))
            _need(ok, f"{where}: {k} must be {want}, got {v!r}")
    return Scene(obj["description"], [Sound(**d) for d in obj["text"]], obj["added"], obj["changed"], obj["removed"])


def ambience_ids(scene: Scene) -> list[int]:
    """Ids of the sounds that qualify as ambience: sfx, start 0, |panning| <= 0.1, lasting the whole scene."""
    return [s.id for s in scene.sounds if s.tool == "sfx" and s.start_time == 0
            and abs(s.panning) <= AMBIENCE_PAN and s.end >= scene.duration]


def scene_diff(previous: Scene | None, scene: Scene) -> dict[str, list[int]]:
    """Fig. 8's edit lists from `previous` to `scene`: new, vanished and remixed ids (all empty for a first scene)."""
    old, new = (previous or scene).by_id(), scene.by_id()
    return {"added": sorted(new.keys() - old.keys()), "removed": sorted(old.keys() - new.keys()),
            "changed": sorted(i for i in new.keys() & old.keys() if new[i].mix_params() != old[i].mix_params())}


def validate_scene(scene: Scene, previous: Scene | None = None) -> list[str]:
    """Every Fig. 8 rule `scene` breaks, one message each; after `previous`, also the edit lists and the id rules."""
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
        errors += [f"sound {i}: listed more than once in {k}" for i in sorted(set(listed)) if listed.count(i) > 1]
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
    changed = [(new[i].mix_params(), old[i].mix_params()) for i in new.keys() & old.keys() if new[i] != old[i]]
    if not changed and (added or removed):            # sounds came or went: "change" is one swapped for another
        return "add" if not removed else "remove" if not added else "change" if len(added) == len(removed) == 1 \
            else "open"
    if len(changed) == 1 and not added and not removed:
        moved = [kind for kind, x, y in zip(("volume", "pan", "start", "length"), *changed[0]) if x != y]
        if moved in (["volume"], ["pan"]):
            return moved[0]
    return "open"


# -----------------------------------------------------------------------------
# The toy world: 15 sound classes, each with one caption, one synthesis recipe and the words a user calls it by

class Layer(NamedTuple):
    """One synthesis layer; a class sums one or two, and two with equal timing fields share their event times."""
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
    """A sound of the toy world. The word fields are "|"-separated alternatives the simulated user draws from."""
    name: str                  # class name
    bed: bool                  # an ambience (lasts the whole scene, centred) rather than an event
    top: float                 # loudest loudness the designer gives it, dB (knocks are soft, a siren is not)
    caption: str               # the one caption the designer writes (the plan's "text")
    keywords: str              # words of a seed sentence or of a free caption that call for it
    layers: tuple              # synthesis recipe
    nouns: str                 # noun phrases asking for it ("a barking dog"); a level adjective follows the article
    names: str                 # short names after "the" ("remove the dog")
    clauses: str               # subject and verb ("a dog barks")
    settings: str = ""         # beds: places that imply it ("by the sea")


L, C = Layer, SoundClass
SOUND_CLASSES = {c.name: c for c in (  # name, bed, top, caption, keywords; layers; nouns, names; clauses, settings
    C("rain", True, -18, "steady rain falling", "rain rainy rainfall raining storm wet drizzle roof umbrella shower",
      (L("noise", 800, 12000, am=(-0.5, 0.2)), L("noise", 3000, 12000, rate=40, jit=1, dur=0.015, gain=0.6)),
      "rain|steady rain|rainfall|a rain shower|rain on the roof|falling rain|a rainstorm|drizzle", "rain|rainfall",
      "the rain falls|rain pours down|the rain keeps falling|rain patters on the roof",
      "on a rainy day|in the rain|during a rainstorm"),
    C("wind", True, -18, "wind blowing through trees", "wind windy gust gusts breeze hill cold winter snow howling",
      (L("noise", 150, 700, am=(-0.4, 0.9)), L("noise", 900, 1400, am=(-0.3, 1.0), gain=0.3)),
      "wind|a howling wind|gusts of wind|a strong wind|wind in the trees|a breeze|blowing wind", "wind|gusts|breeze",
      "the wind howls|the wind blows|a strong wind blows|the wind gusts", "on a windy hill|on a stormy day"),
    C("fire", True, -20, "a crackling fire", "fire fireplace campfire flames crackling warm burning logs camped",
      (L("noise", 100, 1200, am=(-1, 0.3)), L("noise", 1500, 9000, rate=12, jit=1, dur=0.02)),
      "a fire|a crackling fire|a campfire|a fireplace|crackling flames|a log fire", "fire|campfire|fireplace|flames",
      "a fire crackles|the fire crackles|a campfire burns|the fireplace crackles",
      "by the fireplace|around a campfire|by the fire"),
    C("fan", True, -16, "the hum of an electric fan", "fan room office machine hum humming indoor study afternoon",
      (L("tone", 100, 6), L("noise", 200, 2000, gain=0.6)),
      "a fan|a humming fan|an electric fan|the hum of a fan|a fan in a quiet room|a machine hum", "fan|hum|humming",
      "a fan hums|an electric fan whirs|the fan keeps humming|a fan runs", "in a quiet office|in a small room"),
    C("waves", True, -16, "ocean waves crashing on the shore", "sea ocean beach waves shore harbour boat ship surf",
      (L("noise", 100, 4000, am=(0.12, 0.95)),),
      "waves|ocean waves|the sea|waves on the shore|the surf|the ocean", "waves|sea|ocean|surf",
      "the waves crash|waves roll in|the sea roars|waves wash on the shore", "by the sea|at the beach|on the shore"),
    C("dog", False, -12, "a dog barking", "dog dogs bark barks barked barking puppy farm yard",
      (L("tone", 450, 14, rate=0.7, jit=0.5, dur=0.22, shape="h", group=2, gap=0.3, glide=0.8),
       L("noise", 500, 3000, rate=0.7, jit=0.5, dur=0.22, shape="h", group=2, gap=0.3, gain=0.4)),
      "a dog|a dog barking|a barking dog|barking|a puppy barking|dog barks|a dog that barks", "dog|barking|dog barking",
      "a dog barks|the dog barks|a dog starts barking|a puppy yaps"),
    C("bells", False, -12, "church bells ringing", "bell bells church chime chimes village sunday wedding tower",
      (L("bell", 400, 0, rate=0.5, dur=3.0),),
      "bells|church bells|a church bell|a bell ringing|bells ringing|chimes of a bell", "bells|bell|church bells",
      "church bells ring|a bell rings|the bells chime|a church bell tolls"),
    C("knocking", False, -16, "knocking on a wooden door", "door knock knocks knocked knocking visitor",
      (L("noise", 150, 900, rate=0.4, jit=0.3, dur=0.15, group=3, gap=0.22),
       L("tone", 190, 3, rate=0.4, jit=0.3, dur=0.2, group=3, gap=0.22)),
      "knocking|a knock at the door|knocks on a door|knocking at the door|door knocks", "knocking|knocks|knock",
      "someone knocks|somebody knocks on the door|a visitor knocks|someone knocks at the door"),
    C("siren", False, -10, "a police siren wailing", "siren sirens police ambulance emergency accident",
      (L("tone", 700, 4, vib=(0.3, 0.3)),),
      "a siren|an ambulance siren|a police siren|sirens|an ambulance|a wailing siren", "siren|sirens|ambulance",
      "a siren wails|an ambulance passes|a police siren sounds|sirens wail"),
    C("birds", False, -12, "birds singing", "bird birds birdsong morning garden forest spring park dawn chirping",
      (L("tone", 2800, 2, rate=5, jit=0.6, dur=0.12, shape="g", glide=1.5, vib=(30, 0.04)),),
      "birds|birdsong|birds singing|a bird|chirping birds|songbirds", "birds|birdsong|bird",
      "birds sing|a bird chirps|birds chirp|songbirds sing"),
    C("thunder", False, -12, "a rumble of thunder", "thunder thunderclap storm lightning rumble",
      (L("noise", 30, 400, rate=0.3, jit=0.5, dur=3.0, am=(-8, 0.6)),
       L("noise", 800, 6000, rate=0.3, jit=0.5, dur=0.8, shape="h", gain=0.5)),
      "thunder|a thunderclap|a rumble of thunder|thunder rolling|rolling thunder", "thunder|thunderclap",
      "thunder rumbles|thunder rolls|thunder cracks|a thunderclap breaks"),
    C("phone", False, -12, "a telephone ringing", "phone telephone call rang office",
      (L("tone", 440, 3, rate=0.33, dur=1.2, shape="g", am=(20, 0.8)),
       L("tone", 480, 3, rate=0.33, dur=1.2, shape="g", am=(20, 0.8))),
      "a phone|a phone ringing|a telephone|a ringing phone|the telephone", "phone|telephone|ringing phone",
      "a phone rings|the telephone rings|a phone starts ringing|the phone rings"),
    C("piano", False, -12, "a slow piano melody", "piano music melody song concert playing",
      (L("tone", 220, 8, rate=1.5, jit=0.1, dur=1.2, notes=True),),
      "a piano|piano music|a piano melody|some piano|a piano tune", "piano|piano music|melody",
      "a piano plays|someone plays the piano|piano music plays|a piano plays a tune"),
    C("cat", False, -12, "a cat meowing", "cat cats kitten meow meowing pet kitchen",
      (L("tone", 500, 8, rate=0.4, jit=0.5, dur=0.7, shape="h", glide=0.7, vib=(5, 0.02)),),
      "a cat|a cat meowing|a meowing cat|a kitten|meowing", "cat|meowing|kitten",
      "a cat meows|the cat meows|a kitten mews|a cat cries"),
    C("footsteps", False, -18, "footsteps on a wooden floor", "footsteps steps walk walked walking corridor stairs",
      (L("noise", 100, 2500, rate=1.9, jit=0.08, dur=0.25),),
      "footsteps|steps|footsteps on wood|walking|footsteps in the hall", "footsteps|steps|walking",
      "someone walks by|footsteps approach|somebody walks across the room|steps echo"),
)}
BEDS, EVENTS = [n for n, c in SOUND_CLASSES.items() if c.bed], [n for n, c in SOUND_CLASSES.items() if not c.bed]
_BELL = ((0.5, 0.5), (1.0, 1.0), (1.19, 0.6), (1.5, 0.4), (2.0, 0.5), (2.52, 0.3), (3.01, 0.2))  # (ratio, amplitude)
_PENTATONIC = (0, 2, 4, 7, 9, 12, 14)  # semitones above f0


def caption_to_class(caption: str) -> str:
    """The sound class a caption asks for: its own caption, else the most keyword hits (ties: table order)."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    hits = {n: (c.caption == caption, len(words & set(c.keywords.split()))) for n, c in SOUND_CLASSES.items()}
    return max(hits, key=hits.get)


def _band_noise(n: int, lo: float, hi: float, tilt: float, g: torch.Generator) -> torch.Tensor:
    """[n] unit-RMS noise, band-passed with 4th-order edges at lo and hi Hz, tilted by (f / 1 kHz) ** tilt."""
    f = torch.fft.rfftfreq(n, 1 / SAMPLE_RATE).clamp(min=1.0)
    X = torch.complex(torch.randn(len(f), generator=g), torch.randn(len(f), generator=g))
    x = torch.fft.irfft(X * (f / 1000) ** tilt / torch.sqrt((1 + (lo / f) ** 4) * (1 + (f / hi) ** 4)), n)
    return x / x.pow(2).mean().sqrt().clamp(min=1e-12)


def synth_layer(layer: Layer, n: int, pitch: float, rate: float, tilt: float, seed: int) -> torch.Tensor:
    """[n] one layer at 48 kHz, unit RMS; `pitch`, `rate`, `tilt` scale its frequencies, event rate and slope."""
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
        # The first group starts within 50 ms of the sound's start: the plan's start_time is when it is heard.
        timing, period, span = random.Random(seed // 2), 1 / (layer.rate * rate), layer.gap * (layer.group - 1)
        t0 = timing.uniform(0, 0.05)
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


class ProceduralSFX:
    """The built-in SFX tool: the caption picks a class; `rng` varies pitch, event rate and timbre (spectral tilt)."""

    def render(self, sound: Sound, voice, rng: random.Random) -> torch.Tensor:
        cls, n = SOUND_CLASSES[caption_to_class(sound.text)], round(sound.duration * SAMPLE_RATE)
        pitch, rate, tilt = 2 ** (rng.uniform(-2, 2) / 12), rng.uniform(0.8, 1.25), rng.uniform(-0.15, 0.15)
        seed = rng.getrandbits(60) * 4
        return sum(layer.gain * synth_layer(layer, n, pitch, rate, tilt, seed + i)
                   for i, layer in enumerate(cls.layers))


def voice_for(speaker: str, gender: str) -> tuple[float, int]:
    """(speaking-rate factor, espeak-ng variant): one voice per (speaker, gender) in every turn (paper A.2)."""
    rng = random.Random(f"{speaker.strip().lower()}|{gender}")   # str seeds hash with SHA-512: the same on every run
    return rng.uniform(0.9, 1.1), rng.randint(1, 5 if gender == "female" else 7)


class EspeakTTS:
    """espeak-ng as the TTS tool (`--tts espeak`): the voice variant by speaker, pitch and rate by emotion."""
    EMOTIONS = {"happy": (1.15, 1.1), "excited": (1.25, 1.2), "sad": (0.88, 0.8), "angry": (1.05, 1.15),  # (pitch,
                "calm": (0.95, 0.88), "scared": (1.2, 1.25), "surprised": (1.2, 1.0)}   # rate); others read as neutral

    def render(self, sound: Sound, voice: tuple[float, int], rng: random.Random) -> torch.Tensor:
        if shutil.which("espeak-ng") is None:
            raise RuntimeError("espeak-ng not found on PATH; install it (e.g. `apt-get install espeak-ng`)")
        pitch, speed = self.EMOTIONS.get(sound.emotion, (1.0, 1.0))
        cmd = ["espeak-ng", "-v", f"en-us+{'f' if sound.gender == 'female' else 'm'}{voice[1]}", "-s",
               str(round(165 * voice[0] * speed)), "-p", str(min(99, round(50 * pitch))), "--stdout", sound.text]
        data, sr = sf.read(io.BytesIO(subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout))
        return resample(torch.from_numpy(data).float(), sr, SAMPLE_RATE)


# -----------------------------------------------------------------------------
# Rendering with a cache (paper A.2), loudness (ITU-R BS.1770-4) and the mixer

class Renderer:
    """Renders sounds with pluggable tools, caching by tool parameters: a loudness, panning or start-time edit renders
    nothing again (A.2). One Renderer per conversation (its caches grow). A tool (a model plugs in this way) has
    render(sound, voice, rng) -> mono [S] float at 48 kHz, where voice = voice_for(speaker, gender) of a tts sound."""

    def __init__(self, tools: dict | None = None, seed: int | str = 0):
        self.tools = tools if tools is not None else {"sfx": ProceduralSFX()}   # the toy world has no speech
        self.seed, self.renders = seed, 0   # the seed and the tool parameters fix every render; renders: tool calls
        self.cache, self.levelled = {}, {}  # tool params -> [S] render; mix_scene's levelled sounds ([F * HOP], LUFS)

    def render(self, sound: Sound) -> torch.Tensor:
        """[round(duration * 48000)] mono waveform of `sound` (trimmed or zero-padded to its duration)."""
        if (key := sound.tool_params()) in self.cache:
            return self.cache[key]
        if sound.tool not in self.tools:
            fix = "; speech needs a TTS tool: --tts espeak, or Renderer({..., 'tts': MyTTS()})" * (sound.tool == "tts")
            raise ValueError(f"sound {sound.id}: no {sound.tool!r} tool (have {sorted(self.tools)}){fix}")
        voice = voice_for(sound.speaker or "", sound.gender or "") if sound.tool == "tts" else None
        x = self.tools[sound.tool].render(sound, voice, random.Random(f"{self.seed}|{key}")).float().squeeze()
        if x.dim() != 1 or not torch.isfinite(x).all():
            raise ValueError(f"tool {sound.tool!r} returned shape {tuple(x.shape)} for sound {sound.id}, or non-finite "
                             f"values; a tool returns a finite mono [S] tensor")
        n, self.renders = round(sound.duration * SAMPLE_RATE), self.renders + 1
        self.cache[key] = torch.nn.functional.pad(x[:n], (0, max(0, n - len(x))))
        return self.cache[key]


# K-weighting at 48 kHz, BS.1770-4 Tables 1 and 2: (b, a) of the shelving pre-filter and the RLB high-pass.
_K_WEIGHTING = (((1.53512485958697, -2.69169618940638, 1.19839281085285), (1.0, -1.69065929318241, 0.73248077421585)),
                ((1.0, -2.0, 1.0), (1.0, -1.99004745483398, 0.99007225036621)))


def k_weight(x: torch.Tensor) -> torch.Tensor:
    """[C, S] -> [C, S] K-weighted at 48 kHz: the biquads' response on an FFT grid (exact: 16384 samples of padding)."""
    S = x.shape[-1]
    n = 1 << (S + 16384 - 1).bit_length()
    z = torch.exp(-1j * torch.linspace(0, math.pi, n // 2 + 1, dtype=torch.float64))  # z^-1 on the rfft grid
    response = math.prod((b[0] + b[1] * z + b[2] * z * z) / (a[0] + a[1] * z + a[2] * z * z) for b, a in _K_WEIGHTING)
    return torch.fft.irfft(torch.fft.rfft(x.double(), n) * response, n)[..., :S]


def integrated_loudness(x: torch.Tensor) -> float:
    """Integrated loudness, LUFS, of [C, S] or [S] at 48 kHz (ITU-R BS.1770-4). A sound shorter than 0.5 s is
    tiled to 0.5 s first and the result floored at -70 LUFS (Scaper's rule): every sound has a loudness."""
    if x.shape[-1] == 0:
        return -70.0
    x = x.reshape(-1, x.shape[-1]).double()
    if x.shape[-1] < SAMPLE_RATE // 2:
        x = x.repeat(1, -(-(SAMPLE_RATE // 2) // x.shape[-1]))
    block, step = int(0.4 * SAMPLE_RATE), int(0.1 * SAMPLE_RATE)
    return gated_loudness(k_weight(x).pow(2).unfold(-1, block, step).mean(-1).sum(0))  # channels' block mean squares


def gated_loudness(power: torch.Tensor) -> float:
    """LUFS of K-weighted block powers [J] (400 ms blocks every 100 ms, summed over channels): BS.1770-4 gating."""
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


def limit_peaks(x: torch.Tensor, ceiling: float, block: int = 240) -> tuple[torch.Tensor, float]:
    """([S] or [C, S] within +-ceiling, the deepest gain reduction in dB), one gain for all channels. Per 5 ms block
    min(1, ceiling / peak), then the minimum with both neighbours, interpolated between block centres: no overshoot."""
    S = x.shape[-1]
    peak = torch.nn.functional.pad(x.abs().reshape(-1, S).amax(0), (0, -S % block)).view(-1, block).amax(1)
    need = (ceiling / peak.clamp(min=1e-12)).clamp(max=1.0)
    need = -torch.nn.functional.max_pool1d(-need[None, None], 3, 1, 1)[0, 0]
    t = (torch.arange(S) + 0.5) / block - 0.5                      # sample position in block-centre units
    i = t.floor().long().clamp(0, len(need) - 1)
    j, w = (i + 1).clamp(max=len(need) - 1), (t - t.floor()).clamp(0, 1)
    gain = need[i] * (1 - w) + need[j] * w
    return (x * gain).clamp(-ceiling, ceiling), round(20 * math.log10(float(gain.min())), 2)   # clamp: float rounding


def set_loudness(x: torch.Tensor, lufs: float) -> tuple[torch.Tensor, float]:
    """([S] at `lufs` integrated loudness, the loudness reached); peaks over -1 dBFS are limited, the gain corrected."""
    if (now := integrated_loudness(x)) <= -70:
        return x * 0, -70.0
    g, g_prev, err_prev = lufs - now, None, None                       # dB: the gain without limiting
    if float((y := x * 10 ** (g / 20)).abs().max()) <= SOUND_CEILING:
        return y, lufs
    for _ in range(5):
        y = limit_peaks(x * 10 ** (g / 20), SOUND_CEILING)[0]
        err = lufs - integrated_loudness(y)
        if abs(err) < 0.05 or (err_prev is not None and abs(err_prev - err) < 0.01):  # done, or saturated
            break
        slope = (err_prev - err) / (g - g_prev) if g_prev is not None else 1.0
        g_prev, err_prev, g = g, err, g + min(20.0, err / max(slope, 0.05))
    return y, lufs - err


class Mix(NamedTuple):
    audio: torch.Tensor                              # [2, ceil(duration * 40) * 1200] float32 at 48 kHz
    activity: dict[int, list[tuple[float, float]]]   # sound id -> active intervals, s, on the 40 Hz grid
    limited_db: float                                # deepest gain reduction of the mix limiter, dB (0: no clipping)
    level_error: float                               # dB, largest |reached - asked| loudness of a sound


def mix_scene(scene: Scene, renderer: Renderer) -> Mix:
    """The 48 kHz stereo mix: each sound faded, placed, set to `loudness` LUFS where it sits, panned and added; the
    sum limited at 0.99. Activity: the 40 Hz frames within 30 dB of the sound's loudest, gaps up to 100 ms bridged."""
    F = scene.num_frames(GRID)
    out, activity, shortfall = torch.zeros(2, F * HOP), {}, 0.0
    for s in scene.sounds:
        key = (s.tool_params(), s.loudness, s.start_time, F)
        if key not in renderer.levelled:                               # a panning edit reuses the levelled sound
            x, a = renderer.render(s).clone(), round(s.start_time * SAMPLE_RATE)
            m = min(len(x), int(FADE * SAMPLE_RATE) + 1)
            fade = 0.5 - 0.5 * torch.cos(math.pi * torch.arange(m) / m)
            x[:m] *= fade
            x[len(x) - m:] *= fade.flip(0)
            placed = torch.zeros(F * HOP)
            placed[a:a + len(x)] = x[:F * HOP - a]
            renderer.levelled[key] = set_loudness(placed, s.loudness)  # the silence around it falls below the gate
        placed, reached = renderer.levelled[key]
        shortfall = max(shortfall, abs(reached - s.loudness))
        out += torch.stack([g * placed for g in pan_gains(s.panning)])
        energy = 10 * torch.log10(placed.view(F, HOP).pow(2).mean(1) + 1e-20)  # [F] dB per frame
        runs = []                                                               # [start, end) frames of active runs
        for f in torch.nonzero((energy > energy.max() - ACTIVITY_DB) & (energy > -100)).flatten().tolist():
            if runs and f - runs[-1][1] <= 4:                                   # bridge gaps up to 100 ms
                runs[-1][1] = f + 1
            else:
                runs.append([f, f + 1])
        activity[s.id] = [(i / GRID, j / GRID) for i, j in runs]
    audio, limited_db = limit_peaks(out, MIX_CEILING)
    return Mix(audio, activity, limited_db, round(shortfall, 2))


# -----------------------------------------------------------------------------
# The offline designer: a simulated user and sound designer for the toy world (the default backend)

# Seeds: the paper seeds AudioCopilot with LibriSpeech and Common Voice transcripts (A.0); these sentences are ours.
# Their words pick matching classes some of the time (a light bias); evaluation seeds are disjoint from training's.
TRAIN_SEEDS = ("The rain had not stopped for three days.", "The dog ran out into the yard.", "Somebody knocked twice.",
               "Far away, the church bells rang for the wedding.", "We sat by the fire and listened to the wind.",
               "Birds sang in the garden at dawn.", "A cat slept on the kitchen floor.", "The waves broke gently.",
               "An ambulance raced down the street.", "A quiet room, a humming fan and a long afternoon.",
               "The piano played softly in the hall.", "Thunder rolled over the fields.", "The phone rang at noon.",
               "Footsteps echoed in the corridor.", "The ship left the harbour before sunrise.", "A winter night.")
EVAL_SEEDS = ("Snow fell quietly on the mountain village.", "The fishermen pulled their boat onto the shore.",
              "A dog barked when the stranger walked past the farm.", "They camped by the river and lit a fire.",
              "Lightning lit up the old house on the hill.", "The telephone would not stop.", "Music upstairs.")
# The user's words. SIDES: side -> (the panning range the designer honours, phrases); LEVELS: level -> (adjectives
# for a noun phrase, all starting with a consonant: "an old fan" -> "a loud old fan"; adverbs for a clause).
SIDES = {side: (pans, words.split("|")) for side, pans, words in (
    ("left", (-0.8, -0.5), "on the left|to the left|from the left|on the left side|in the left channel"),
    ("hard left", (-1.0, -1.0), "hard left|far left|all the way to the left|fully left"),
    ("right", (0.5, 0.8), "on the right|to the right|from the right|on the right side|in the right channel"),
    ("hard right", (1.0, 1.0), "hard right|far right|all the way to the right|fully right"),
    ("centre", (0.0, 0.0), "in the middle|in the centre|in the center|centered"))}
LEVELS = {"loud": (("loud", "very loud", "noisy"), ("loudly", "loud and close")),
          "quiet": (("quiet", "soft", "faint", "gentle", "distant"), ("softly", "quietly", "in the distance"))}
NUMBERS = ("zero", "one", "two", "three")
# The rest is "|"-separated: STARTS (how a user says 0 s), BACKGROUND (a bed's), FILLERS (a time or place), STORY and
# SETTING (a story's templates: {x} the sounds, {s} a setting, capitalised {X} {S}), EDIT_WORDS ({x} a sound's short
# name, {y} a noun phrase, {p} a side, {more} "a bit louder", {up} "up"/"down").
STARTS = "at the start|right at the beginning|from the start|straight away".split("|")
BACKGROUND = "in the background|as the background|all the way through|throughout".split("|")
FILLERS = ("at night|in the morning|in a small village|on a cold evening|somewhere in the countryside|in the city|"
           "late at night|on a quiet afternoon|in an old house|at dawn|outside|in winter").split("|")
STORY = ("Create a soundscape with {x}.|I'd like to hear {x}.|Make an audio scene with {x}.|Give me {x}.|"
         "Can you make a scene with {x}?|Let me hear {x}.|Generate {x}.|Play {x}.|I want {x}.|Compose a scene: {x}.|"
         "Please create {x}.|An audio story with {x}.|Picture this: {x}.|Set the scene with {x}.|{X}.|{X}, please.|"
         "Design a sound scene with {x}.|Could I hear {x}?|Make me a soundscape of {x}.|A scene where there is {x}."
         ).split("|")
SETTING = "{S}, with {x}.|{X} {s}.|A scene {s}: {x}.|I want {x} {s}.".split("|")
EDIT_WORDS = {k: v.split("|") for k, v in {
    "add": "Add {y}.|Can you add {y}?|Put in {y}.|I want to hear {y} too.|Let's also have {y}.|Bring in {y}.|"
           "Include {y}, please.|Also add {y}.|Now add {y}.|Could you add {y}?",
    "remove": "Remove the {x}.|Get rid of the {x}.|Take out the {x}.|I don't want the {x} anymore.|"
              "Please delete the {x}.|Lose the {x}.|Can you drop the {x}?|No more {x}.|Cut the {x}.",
    "change": "Replace the {x} with {y}.|Swap the {x} for {y}.|Instead of the {x}, I want {y}.|Change the {x} to {y}.|"
              "Turn the {x} into {y}.|Could the {x} be {y} instead?|Use {y} instead of the {x}.",
    "volume": "Make the {x} {more}.|Can you make the {x} {more}?|The {x} should be {more}.|I'd like the {x} {more}.|"
              "Turn the {x} {up}.|Could the {x} be {more}?|Turn {up} the {x}.",
    "pan": "Move the {x} {p}.|Pan the {x} {p}.|Place the {x} {p}.|Could you put the {x} {p}?|I want the {x} {p}.|"
           "Shift the {x} {p}.|Put the {x} {p}.",
    "busier": "Make it busier.|The scene feels empty, fill it up.|Add more life to the scene.|Make it more lively.|"
              "Add a couple more sounds.",
    "calmer": "Make it calmer.|Tone everything down a little.|It's too hectic, make it more relaxed.|"
              "Make the foreground softer.|Everything except the background a bit quieter.",
    "wider": "Make it sound wider.|Spread the sounds out in the stereo field.|Give the scene more space.|"
             "Open up the stereo image.",
    "later": "Let the events start a bit later.|Give it a slower build-up.|Delay the foreground sounds by a second.|"
             "Start everything a second later.",
    "shorter": "Make the sounds shorter.|Tighten everything up, the sounds go on too long.|"
               "Keep the foreground sounds brief."}.items()}


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass
class Spec:
    """What the user states about one sound: its class and, where said, its side, level and start time."""
    cls: str
    side: str | None = None     # a key of SIDES
    level: str | None = None    # a key of LEVELS
    start: float | None = None  # s


@dataclass
class Simulation:
    """The state of one simulated conversation, passed to every step of the offline designer."""
    rng: random.Random        # everything random comes from here: a conversation is a function of the rng's state
    matched: list[str]        # sound classes whose keywords the seed sentence contains
    ids: Iterator[int] = field(default_factory=itertools.count)   # next(sim.ids): ids are never reused

    def pick(self, pool: list[str], exclude: set[str]) -> str:
        """A class of `pool` not in `exclude`: a seed-matched one 60 % of the time when there is one, else any."""
        pool = [n for n in pool if n not in exclude]
        matched = [n for n in self.matched if n in pool]
        return self.rng.choice(matched if matched and self.rng.random() < 0.6 else pool)


def _spec(cls: str, rng: random.Random, length: float, p_side=0.6, p_level=0.25, p_time=0.3) -> Spec:
    """An event as a user asks for it, each attribute stated with its probability."""
    return Spec(cls, rng.choice(list(SIDES)) if rng.random() < p_side else None,
                rng.choice(list(LEVELS)) if rng.random() < p_level else None,
                min(rng.choice((0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)), length - 1) if rng.random() < p_time else None)


def _say(spec: Spec, rng: random.Random, clause: bool = False, bed: bool = False) -> str:
    """The user's words for a sound with its stated level, side and start: a noun phrase or (`clause`) a sentence."""
    c = SOUND_CLASSES[spec.cls]
    words = rng.choice((c.clauses if clause else c.nouns).split("|")).split()
    if spec.level and clause:                          # "a dog barks loudly"
        words.append(rng.choice(LEVELS[spec.level][1]))
    elif spec.level:                                   # after the article: "an electric fan" -> "a quiet electric fan"
        at = int(words[0] in ("a", "an", "the", "some"))
        words[at:at] = [rng.choice(LEVELS[spec.level][0])]
        words[0] = "a" if words[0] == "an" else words[0]
    stated = [rng.choice(SIDES[spec.side][1])] if spec.side else []
    if (t := spec.start) is not None:                  # "at the start", "after 1.5 seconds", "after two seconds"
        n, whole = f"{t:g} second" + "s" * (t != 1), f"{NUMBERS[int(t)]} second" + "s" * (t != 1)
        stated.append(rng.choice(STARTS if t == 0 else (f"after {n}", f"at {n}", f"{n} in") + (
            (f"after {whole}", f"at the {t:g} second mark") if t.is_integer() else ())))
    rng.shuffle(stated)
    return " ".join(words + stated + ([rng.choice(BACKGROUND)] if bed and rng.random() < 0.4 else []))


def _design(sim: Simulation, spec: Spec, length: float, bed: bool = False) -> Sound:
    """The designer's sound for what the user stated (a stated level or side gets its own range); the rest is free."""
    rng, sid, c, top = sim.rng, next(sim.ids), SOUND_CLASSES[spec.cls], int(SOUND_CLASSES[spec.cls].top)
    if bed:                                            # a bed lasts the whole scene, centred
        loudness = rng.randint(*{"loud": (-22, -20), "quiet": (-30, -28)}.get(spec.level, (-27, -23)))
        return Sound(sid, "sfx", c.caption, loudness, 0.0, 0.0, length)
    loudness = rng.randint(*{"loud": (top - 2, top), "quiet": (-28, -24)}.get(spec.level, (-23, top - 3)))
    lo, hi = SIDES[spec.side][0] if spec.side else (-0.9, 0.9)
    duration = round(rng.uniform(1.0, min(3.0, length)), 1)
    if spec.start is None:
        start = round(rng.uniform(0, max(0.0, min(MAX_START, length - duration))), 1)
    else:
        start, duration = spec.start, round(min(duration, length - spec.start), 1)
    return Sound(sid, "sfx", c.caption, loudness, round(rng.uniform(lo, hi), 1), start, duration)


def _scene(sounds: list[Sound], previous: Scene | None = None) -> Scene:
    """The designer's scene: a description naming every sound, and the edit lists of scene_diff."""
    parts = [s.text for s in sounds]
    description = parts[0].capitalize() + (", with " + _join(parts[1:]) if parts[1:] else "") + "."
    return Scene(description, sounds, **scene_diff(previous, Scene(description, sounds)))


def _story(sim: Simulation, n_events: int | None = None) -> tuple[str, Scene, list[Spec]]:
    """A story turn: (prompt, scene, what the prompt stated, bed first), worded in one of three ways."""
    rng, mode = sim.rng, sim.rng.random()
    length = rng.choice((4.0, 5.0, 5.0, 6.0))
    bed = Spec(sim.pick(BEDS, set()), level=rng.choice(list(LEVELS)) if mode < 0.8 and rng.random() < 0.15 else None)
    events = []
    for _ in range(n_events or rng.choice((1, 1, 2, 2, 3))):
        events.append(_spec(sim.pick(EVENTS, {e.cls for e in events}), rng, length))
    sounds = [_design(sim, bed, length, bed=True)] + [_design(sim, e, length) for e in events]
    if mode < 0.45:                                    # 45 %: a request listing the sounds, the bed first or last
        items = [_say(bed, rng, bed=True)] + [_say(e, rng) for e in events]
        items = _join(items[1:] + items[:1] if rng.random() < 0.5 else items)
        items += " " + rng.choice(FILLERS) if rng.random() < 0.25 else ""
        text = rng.choice(STORY).format(x=items, X=items[0].upper() + items[1:])
    elif mode < 0.8:                                   # 35 %: sentences: the rain falls, while a dog barks on the left
        parts = [_say(bed, rng, clause=True)] + [_say(e, rng, clause=True) for e in events]
        parts = parts if rng.random() < 0.5 else parts[1:] + parts[:1]
        text = rng.choice((", while ", " and ", ", as ", " while ")).join(parts[:2])
        text += ", " + _join(parts[2:]) if parts[2:] else ""
        text = (rng.choice(FILLERS) + ", " if rng.random() < 0.3 else "") + text
        text = text[0].upper() + text[1:] + "."
    else:                                              # 20 %: a setting that implies the bed: by the sea, with ...
        s, x = rng.choice(SOUND_CLASSES[bed.cls].settings.split("|")), _join([_say(e, rng) for e in events])
        text = rng.choice(SETTING).format(s=s, S=s[0].upper() + s[1:], x=x, X=x[0].upper() + x[1:])
    return text, _scene(sounds), [bed] + events


def _edit(sim: Simulation, scene: Scene, kind: str) -> tuple[str, list[Sound]] | None:
    """An edit of `kind` in the user's words and the new scene's sounds, or None when the scene does not allow it.
    One sound: add, remove (an ambience stays), change (a bed for a bed, a new id), volume (+-4..8 dB), pan (0.3 away
    or more); open: busier (two new sounds), or calmer, wider, later or shorter foreground sounds."""
    rng, sounds, amb = sim.rng, scene.sounds, ambience_ids(scene)[:1]
    used, foreground = {caption_to_class(s.text) for s in sounds}, [s for s in sounds if s.id not in amb]
    name = lambda s: rng.choice(SOUND_CLASSES[caption_to_class(s.text)].names.split("|"))  # "remove the dog"
    swap = lambda old, new: [new if s is old else s for s in sounds]
    if kind == "add" and len(sounds) < 6:                               # room for busier, then add
        spec = _spec(sim.pick(EVENTS, used), rng, scene.duration, 0.5, 0.25, 0.4)
        new = _design(sim, spec, scene.duration)
        return rng.choice(EDIT_WORDS["add"]).format(y=_say(spec, rng)), sounds + [new]
    if kind == "remove" and foreground:
        gone = rng.choice(foreground)
        return rng.choice(EDIT_WORDS["remove"]).format(x=name(gone)), [s for s in sounds if s is not gone]
    if kind == "change":
        old = rng.choice(sounds)
        c = SOUND_CLASSES[sim.pick(BEDS if old.id in amb else EVENTS, used)]
        new = replace(old, id=next(sim.ids), text=c.caption, loudness=min(old.loudness, c.top))
        return rng.choice(EDIT_WORDS["change"]).format(x=name(old), y=rng.choice(c.nouns.split("|"))), swap(old, new)
    if kind == "volume" and (options := [(s, d) for s in sounds for d in (rng.randint(4, 8), -rng.randint(4, 8))
                                         if -30 <= s.loudness + d <= SOUND_CLASSES[caption_to_class(s.text)].top]):
        s, d = rng.choice(options)
        more = rng.choice(("", "a bit ", "a little ") if abs(d) < 6 else ("much ", "a lot ")) + \
            ("louder" if d > 0 else "quieter")
        instruction = rng.choice(EDIT_WORDS["volume"]).format(x=name(s), more=more, up="up" if d > 0 else "down")
        return instruction, swap(s, replace(s, loudness=s.loudness + d))
    if kind == "pan" and foreground:
        s = rng.choice(foreground)
        (lo, hi), words = rng.choice([v for v in SIDES.values() if min(abs(s.panning - p) for p in v[0]) >= 0.3])
        return rng.choice(EDIT_WORDS["pan"]).format(x=name(s), p=rng.choice(words)), \
            swap(s, replace(s, panning=round(rng.uniform(lo, hi), 1)))
    if kind != "open":
        return None
    fits = lambda s: s.start_time + 1 <= MAX_START and s.end + 1 <= scene.duration
    ops = {"calmer": lambda s: replace(s, loudness=max(-30, s.loudness - 6)),
           "wider": lambda s: replace(s, panning=max(-1.0, min(1.0, s.panning + math.copysign(0.4, s.panning)))),
           "later": lambda s: replace(s, start_time=s.start_time + 1) if fits(s) else s,
           "shorter": lambda s: replace(s, duration=max(0.5, round(s.duration * 0.6, 1)))}
    edits = {op: [f(s) if s.id not in amb else s for s in sounds] for op, f in ops.items()}
    op = rng.choice([op for op, new in edits.items() if new != sounds] + ["busier"] * (len(sounds) <= 4))
    if op == "busier":
        edits[op] = _edit(sim, replace(scene, sounds=_edit(sim, scene, "add")[1]), "add")[1]
    return rng.choice(EDIT_WORDS[op]), edits[op]


class OfflineCopilot:
    """The procedural user and designer, text only: a conversation is a function of (seed text, rng state), < 1 ms."""
    failures = 0   # invalid answers: the procedural designer writes valid scenes by construction (asserted)

    def conversation(self, seed_text: str, rng: random.Random, n_turns: int = 3,
                     kinds: list[str] | None = None) -> list[tuple[str, str, Scene]]:
        """[(instruction, kind, scene)]: a story (a bed, 1-3 events), then edits of `kinds` or of feasible kinds."""
        words = set(re.findall(r"[a-z]+", seed_text.lower()))
        sim = Simulation(rng, [n for n, c in SOUND_CLASSES.items() if words & set(c.keywords.split())])
        text, scene, _ = _story(sim, 2 if kinds else None)
        assert not (errors := validate_scene(scene)), (errors, text)
        turns = [(text, "story", scene)]
        for t in range(1, n_turns):
            previous, options = scene, [kinds[t - 1]] if kinds else rng.sample(EDIT_KINDS, len(EDIT_KINDS))
            kind, edit = next(((k, e) for k in options if (e := _edit(sim, previous, k))), (options, None))
            if edit is None:
                raise RuntimeError(f"no feasible {options} edit for scene {scene_to_json(previous)}")
            errors = validate_scene(scene := _scene(edit[1], previous), previous)
            assert not errors and kind in ("open", classify_edit(previous, scene)), (kind, errors, edit[0])
            turns.append((edit[0], kind, scene))
        return turns

    def t2a(self, rng: random.Random) -> list[tuple[str, str, Scene]]:
        """A single-sound conversation (text-to-audio, captioning), asked for in the user's words for its class."""
        c = SOUND_CLASSES[rng.choice(list(SOUND_CLASSES))]
        loudness, duration = rng.randint(int(max(-30, c.top - 8)), int(c.top)), rng.choice((2, 3, 4))
        return [(rng.choice(c.nouns.split("|")), "t2a", _scene([Sound(0, "sfx", c.caption, loudness, 0, 0, duration)]))]


# -----------------------------------------------------------------------------
# The LLM designer: any OpenAI-compatible chat server (vLLM serving Gemma 3 27B in the paper, A.1)

class CopilotError(RuntimeError):
    """The LLM server failed, or its answers stayed invalid after every attempt."""


def _prompt(tts: bool) -> str:
    """The system prompt: without tts the paper's Fig. 8 word for word ("Example output": Figs. 9-10); the SFX + TTS
    prompt is not printed in the paper, so it is Fig. 8 in the same words plus the tts tool and its fields."""
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
    """The paper's example (Figs. 9-10) as messages; Fig. 10 prints only the added sound "due to lack of space", but
    AudioCopilot always shows all sounds, so the edit lists all four. The speech turn is ours."""
    room = [Sound(0, "sfx", "gentle birdsong outside a window", -28, 0.1, 0, 8),
            Sound(1, "sfx", "antique clock ticking softly", -30, -0.1, 0, 8),
            Sound(2, "sfx", "distant, refined chatter", -30, 0, 0, 8)]
    start, end = ("A peaceful, elegant morning soundscape within a luxurious room. Delicate sounds of birdsong",
                  " create a serene atmosphere. The faint aroma of fresh flowers lingers in the air.")
    first = Scene(start + " and a gentle ticking clock" + end, room)
    second = Scene(start + ", a gentle ticking clock, refined chatter, and someone delicately handling a flower" + end,
                   room + [Sound(3, "sfx", "delicate flower petals rustling", -22, 0, 1.2, 2.5)], added=[3])
    butler = Sound(4, "tts", "Your tea is ready, madam.", -16, 0.3, 4.0, 2.5, "the butler", "male", "calm")
    turns = [("Create a soundscape of a quiet, refined morning in a luxurious room.", first),
             ("I want to emphasize the delicate nature of the flower detail mentioned. Add a sound for someone "
              "delicately handling a flower.", second),
             ("Have a butler politely announce that the tea is ready.", Scene(second.description + " A butler "
              "politely announces that the tea is ready.", second.sounds + [butler], added=[4]))][:2 + tts]
    return [message for instruction, scene in turns for message in (
        {"role": "user", "content": [{"type": "text", "text": instruction}]},
        {"role": "system", "content": [{"type": "json", **json.loads(scene_to_json(scene))}]})]


_KIND_WORDS = {"open": "an open-ended edit", "add": "adding a sound", "remove": "removing a sound",
               "change": "changing one sound into another", "volume": "adjusting the volume of one sound",
               "pan": "adjusting the panning of one sound"}


def chat_completion(base_url: str, model: str, messages: list[dict], timeout: float = 300.0,
                    seed: int | None = None) -> str:
    """The answer of POST {base_url}/chat/completions (OpenAI API; bearer token from $OPENAI_API_KEY)."""
    url, key = base_url.rstrip("/") + "/chat/completions", os.environ.get("OPENAI_API_KEY")
    body = {"model": model, "messages": messages, "temperature": 1.0, "max_tokens": 8192, "seed": seed}
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        request = urllib.request.Request(url, json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]
    except (OSError, LookupError, TypeError, ValueError) as e:        # OSError: HTTP, connection and timeout errors
        raise CopilotError(f"{url}: {type(e).__name__}: {e}; is the server running (e.g. `vllm serve {model}`), and "
                           f"are --base-url and --model right?") from e


def parse_answer(text: str, n_turns: int | None = None, kinds: list[str] | None = None,
                 tts: bool = True) -> tuple[list, list[str]]:
    """An LLM answer (Figs. 9-10: user / system messages) -> ([(instruction, kind, scene)], the rules it breaks)."""
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)          # prefer the fenced block, if any
    text = fenced.group(1) if fenced else text
    try:
        messages = _first_json(text, "[{")
    except json.JSONDecodeError as e:
        raise SceneError(f"the answer holds no valid JSON (character {e.pos}: {e.msg}); return one JSON list") from e
    count = len(messages) if isinstance(messages, list) else 0
    _need(count in ([2 * n_turns] if n_turns else range(2, 2 * MAX_TURNS + 1, 2)),
          f"expected a JSON list of {2 * n_turns if n_turns else f'2 to {2 * MAX_TURNS}'} messages "
          f"(user and system alternating), got {type(messages).__name__} of length {count}")
    turns, errors, previous = [], [], None
    for t, (user, system) in enumerate(zip(messages[::2], messages[1::2]), 1):
        try:                                           # the user's text: a string or [{"type": "text", "text": ...}]
            said = user["content"] if user["role"] == "user" and system["role"] in ("system", "assistant") else None
            said = " ".join(c["text"] for c in said) if isinstance(said, list) else said
            _need(isinstance(said, str) and said.strip(), "expected a user message with text, then a system message")
            scene = parse_scene(system["content"][0] if isinstance(system["content"], list) else system["content"])
        except (LookupError, TypeError) as e:
            raise SceneError(f"turn {t}: malformed message ({e!r}); expected a user message, then a system one") from e
        except SceneError as e:
            raise SceneError(f"turn {t}: {e}") from e
        errors += [f"turn {t}: {e}" for e in validate_scene(scene, previous)] + [
            f"turn {t}: sound {s.id} uses tts, but only the sfx tool exists" for s in scene.sounds
            if s.tool == "tts" and not tts]
        kind = "story" if previous is None else classify_edit(previous, scene)
        if (asked := kinds[t - 2] if kinds and t > 1 else None) not in (None, "open", kind):
            errors.append(f"turn {t}: the edit should be {_KIND_WORDS[asked]}, but the scene's difference is a {kind} "
                          f"edit")
        turns.append((said.strip(), "open" if asked == "open" else kind, scene))
        previous = scene
    return turns, errors


class LLMCopilot:
    """The LLM backend: one chat completion simulates a whole conversation (paper A.2). An invalid answer goes back
    with its errors, up to `attempts` answers; still invalid, the conversation is dropped (CopilotError), or kept
    with its violations if `keep_invalid` and it can be rendered (pre-train on all, fine-tune on the valid: A.3)."""

    def __init__(self, base_url: str, model: str, attempts: int = 3, keep_invalid: bool = False, speech: float = 0.5,
                 timeout: float = 300.0):
        self.base_url, self.model, self.attempts, self.keep_invalid = base_url, model, attempts, keep_invalid
        self.speech, self.timeout = speech, timeout  # share given the SFX + TTS prompt (A.2); s per HTTP request
        self.failures = 0                            # invalid answers seen (each one retried, kept flagged, or dropped)

    def conversation(self, seed_text: str, rng: random.Random, n_turns: int = 3,
                     kinds: list[str] | None = None) -> list[tuple[str, str, Scene]]:
        tts = rng.random() < self.speech                               # paper A.2: one of two prompts at random
        request = f"Inspiration: {seed_text}\n\nSimulate exactly {n_turns} interactions." + (
            f" After the first request, the user's edits are, in order: {'; '.join(map(_KIND_WORDS.get, kinds))}."
            if kinds else "")
        messages = [{"role": "system", "content": _prompt(tts)}, {"role": "user", "content": request}]
        for attempt in range(1, self.attempts + 1):
            answer = chat_completion(self.base_url, self.model, messages, self.timeout, rng.getrandbits(31))
            try:
                turns, problems = parse_answer(answer, n_turns, kinds, tts)
            except SceneError as e:
                turns, problems = [], [str(e)]
            if not problems:
                return turns
            self.failures += 1
            log.warning("invalid answer %d/%d for seed %r:\n%s", attempt, self.attempts, seed_text, "\n".join(problems))
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Your JSON breaks these "
                          "rules:\n" + "\n".join(problems) + "\nReturn the whole corrected JSON list only."}]
        if self.keep_invalid and turns and all(s.tool in ("sfx", "tts")[:1 + tts] and s.duration > 0
                                               for *_, scene in turns for s in scene.sounds):
            return turns                                               # its violations are stored with it
        raise CopilotError(f"no valid conversation for seed {seed_text!r} after {self.attempts} answers; last "
                           f"problems:\n" + "\n".join(problems))


# -----------------------------------------------------------------------------
# Datasets: python copilot.py --out DIR --n N, read back with read_conversations

class ConversationTurn(NamedTuple):
    instruction: str                                 # what the simulated user typed
    kind: str                                        # "story", "t2a", or an edit kind (EDIT_KINDS)
    scene: Scene                                     # the designer's plan (edits carry the previous scene forward)
    audio: Path                                      # the rendered mix, 48 kHz stereo FLAC
    activity: dict[int, list[tuple[float, float]]]   # activity, limited_db, level_error: as in the Mix
    limited_db: float
    level_error: float
    violations: list[str]                            # validate_scene against the previous turn ([]: valid, A.3)


class Conversation(NamedTuple):
    id: str                                          # "{split}-{index:07d}"
    seed_text: str                                   # the sentence that seeded the simulation
    turns: list[ConversationTurn]


def _flag(default, help: str, **argparse_kw):
    return field(default=default, metadata={"help": help, **argparse_kw})


@dataclass
class DatasetConfig:
    """What fixes a dataset's content; stored as DIR/config.json and checked on resume. Each field is a flag."""
    seed: int = _flag(0, "conversation i of a split depends only on (seed, split, i)")
    backend: str = _flag("offline", "the procedural designer, or an OpenAI-compatible LLM server",
                         choices=("offline", "openai"))
    tts: str = _flag("none", "speech: none (the toy world has none; the LLM gets the SFX prompt) or espeak (espeak-ng "
                             "installed; the LLM gets the SFX + TTS prompt half of the time)",
                     choices=("none", "espeak"))
    t2a_frac: float = _flag(0.2, "share of single-sound training conversations (text-to-audio, captioning; offline)")
    max_turns: int = _flag(5, "most turns per training conversation (paper: up to 5)", choices=range(1, 6))
    shard_size: int = _flag(1000, "conversations per shard directory")
    base_url: str = _flag("http://localhost:8000/v1", "openai backend: the server's base URL")
    model: str = _flag("google/gemma-3-27b-it", "openai backend: the served model name (paper A.1)")
    attempts: int = _flag(3, "openai backend: answers per conversation (errors are fed back) before it is dropped")
    keep_invalid: bool = _flag(False, "openai backend: keep conversations still invalid, with their violations (A.3)")
    timeout: float = _flag(300.0, "openai backend: seconds per HTTP request")


def conversation_path(root: Path, split: str, i: int, shard_size: int) -> Path:
    return Path(root) / split / f"{i // shard_size:05d}" / f"{split}-{i:07d}.json"


def _write_json(path: Path, obj, indent: int | None = None) -> None:
    text = json.dumps(obj, ensure_ascii=False, indent=indent, separators=(",", ": ") if indent else (",", ":"))
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def make_conversation(job: tuple[DatasetConfig, Path, str, int]) -> dict:
    """Simulate, render and write conversation i of `split` (the audio, then the JSON that marks it finished) -> its
    kinds, or why it failed. Eval: a story and two edits; each block of three covers the six edit kinds."""
    cfg, root, split, i = job
    path, rng = conversation_path(root, split, i, cfg.shard_size), random.Random(f"{cfg.seed}|{split}|{i}")
    seed_text, offline = rng.choice(EVAL_SEEDS if split == "eval" else TRAIN_SEEDS), OfflineCopilot()
    copilot = offline if cfg.backend == "offline" else LLMCopilot(
        cfg.base_url, cfg.model, cfg.attempts, cfg.keep_invalid, 0.5 * (cfg.tts != "none"), cfg.timeout)
    kinds = random.Random(f"{cfg.seed}|eval-block|{i // 3}").sample(EDIT_KINDS, 6)[2 * (i % 3): 2 * (i % 3) + 2]
    try:
        if split == "eval":
            turns = copilot.conversation(seed_text, rng, 3, kinds)
        elif cfg.backend == "offline" and rng.random() < cfg.t2a_frac:
            turns = offline.t2a(rng)
        else:                                          # 1..max_turns turns, weighted 1, 2, 4, 2, 1 (3 on average)
            n_turns = rng.choices(range(1, cfg.max_turns + 1), (1, 2, 4, 2, 1)[:cfg.max_turns])[0]
            turns = copilot.conversation(seed_text, rng, n_turns)
    except CopilotError as e:
        return {"id": path.stem, "failed": str(e), "invalid_answers": copilot.failures}
    tools = {"sfx": ProceduralSFX()} | ({"tts": EspeakTTS()} if cfg.tts == "espeak" else {})
    renderer, records = Renderer(tools, seed=f"{cfg.seed}|{split}|{i}"), []
    for t, (instruction, kind, scene) in enumerate(turns):
        mix, audio = mix_scene(scene, renderer), path.with_name(f"{path.stem}-t{t}.flac")
        save_audio(audio, mix.audio)
        records.append({"instruction": instruction, "kind": kind, "scene": scene_to_json(scene), "audio": audio.name,
                        "activity": {str(k): [list(v) for v in iv] for k, iv in mix.activity.items()},
                        "limited_db": mix.limited_db, "level_error": mix.level_error,
                        "violations": validate_scene(scene, turns[t - 1][2] if t else None)})
    _write_json(path, {"id": path.stem, "seed_text": seed_text, "turns": records})
    return {"id": path.stem, "kinds": [r["kind"] for r in records], "invalid_answers": copilot.failures}


def write_dataset(root: str | Path, n: int, eval_n: int = 0, cfg: DatasetConfig | None = None,
                  workers: int = 1) -> dict:
    """Write n training and eval_n evaluation conversations under root/{train,eval}/ -> counts. Finished ones are
    skipped and a killed job's *.tmp removed, so a rerun resumes to the same bytes, with any number of workers."""
    root, cfg = Path(root), cfg or DatasetConfig()
    settings = json.loads(json.dumps(vars(cfg)))
    stored = json.loads((root / "config.json").read_text()) if (root / "config.json").exists() else settings
    if diff := {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}:
        raise ValueError(f"{root} was written with other settings (stored, now): {diff}; resume with the same flags "
                         f"or use a new --out")
    _write_json(root / "config.json", settings, indent=1)
    for tmp in root.rglob("*.tmp"):
        tmp.unlink()
    jobs = [(cfg, root, split, i) for split, count in (("train", n), ("eval", eval_n)) for i in range(count)
            if not conversation_path(root, split, i, cfg.shard_size).exists()]
    for split in {job[2] for job in jobs}:             # a split exists even if every conversation of it failed
        (root / split).mkdir(exist_ok=True)
    stats = {"written": 0, "skipped": n + eval_n - len(jobs), "failed": 0, "invalid_answers": 0, "kinds": Counter()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                           # one thread per process: the bytes do not depend on --workers
    try:
        with (multiprocessing.get_context("spawn").Pool(workers, torch.set_num_threads, (1,)) if workers > 1
              else contextlib.nullcontext()) as pool:
            for r in tqdm((pool.imap_unordered if pool else map)(make_conversation, jobs), total=len(jobs),
                          desc=f"copilot -> {root}", unit="conv"):
                if "failed" in r:
                    log.error("%s dropped: %s", r["id"], r["failed"])
                stats["failed" if "failed" in r else "written"] += 1
                stats["invalid_answers"] += r["invalid_answers"]
                stats["kinds"].update(r.get("kinds", []))
    finally:
        torch.set_num_threads(threads)
    return stats


def read_conversation(path: Path) -> Conversation:
    """One conversation file; a malformed file, or one whose audio is missing, is an error naming it."""
    fix = "delete it and rerun the copilot.py command that wrote it, or skip bad files (train.py: --data.skip_bad true)"
    try:
        obj = json.loads(path.read_text())
        turns = [ConversationTurn(
            t["instruction"], t["kind"], parse_scene(t["scene"]), path.parent / t["audio"],
            {int(k): [(float(a), float(b)) for a, b in iv] for k, iv in t["activity"].items()},
            float(t["limited_db"]), float(t["level_error"]), list(t["violations"])) for t in obj["turns"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed conversation file ({type(e).__name__}: {e}); {fix}") from e
    if missing := [t.audio.name for t in turns if not t.audio.is_file()]:
        raise FileNotFoundError(f"{path}: its audio {missing} is missing; {fix}")
    return Conversation(obj["id"], obj["seed_text"], turns)


def read_conversations(root: str | Path, split: str = "train", skip_bad: bool = False) -> list[Conversation]:
    """Every finished conversation of root/split in index order; with skip_bad a malformed one is logged, left out."""
    if not (d := Path(root) / split).is_dir():
        raise FileNotFoundError(f"{d}: no such split; write it with `python copilot.py --out {root} --n N --eval-n M`")
    conversations, paths = [], sorted(d.glob("*/*.json"))
    for path in paths:
        try:
            conversations.append(read_conversation(path))
        except (ValueError, FileNotFoundError) as e:
            if not skip_bad:
                raise
            log.warning("skipped %s", e)
    if len(conversations) < len(paths):
        log.warning("skipped %d of %d conversation files under %s", len(paths) - len(conversations), len(paths), d)
    return conversations


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="AudioCopilot: simulate AudioChat conversations and render their audio.")
    p.add_argument("--out", required=True, help="dataset directory (train/ and eval/ shards, config.json)")
    p.add_argument("--n", type=int, required=True, help="number of training conversations")
    p.add_argument("--eval-n", type=int, default=0, help="held-out evaluation conversations (StoryGen-Eval shape)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (the output does not depend on it)")
    g = p.add_argument_group("dataset settings (DatasetConfig, stored in DIR/config.json)")
    for f in fields(DatasetConfig):
        kw = {"action": "store_true"} if isinstance(f.default, bool) else {"type": type(f.default)}
        g.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kw, **f.metadata)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = DatasetConfig(**{f.name: getattr(a, f.name) for f in fields(DatasetConfig)})
    print(json.dumps(write_dataset(a.out, a.n, a.eval_n, cfg, a.workers)))


if __name__ == "__main__":
    main()
