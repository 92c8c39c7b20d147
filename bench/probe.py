"""The conditioning probe: does the model do what it is asked? Plans that follow the prompt, audio that follows
the plan, edits that make the asked change and no other, descriptions that name what is heard.

    python bench/probe.py --ckpt-dir checkpoints/toy [--data data/toy] [--steps 50] [--json out/probe.json]

Prints one table and writes the numbers as JSON. Runs in under 10 minutes on 2 CPU cores for the toy model.
Sections (issue 12's targets in brackets):
  plans       free-wording story prompts written for this probe (PROMPTS: they name sounds of the toy world,
              some with a side, level or start time) and, with --data, the eval split's turn-0 instructions:
              plans valid as written [>= 90 %], named sounds present [>= 85 %], stated sides [>= 85 %], levels and
              start times honoured; side reading: at the "panning" of each sound with a stated side, the plan
              writer's probability on that side and on the other (equal: it does not read the side words)
  audio       single-event scenes (a quiet bed and one event of each class at pan -1 / 0 / 1 and several onsets)
              rendered by the model from a plan: onset within 0.25 s [>= 80 %], ILD sign right [>= 90 %], level
              error (metrics.plan_adherence, on the waveform); the swap test: the same seed with the event moved
              from left at 1 s to right at 3 s must move the measured onset and ILD with it [every class]; the
              copilot render of the same plans through the VAE is the reference row
  edits       base scenes rendered by copilot and edit requests in free wording, per kind (add, remove, change,
              volume, pan, open): the new plan makes the asked change and no other [>= 70 % each]; the audio:
              how many dB the kept sounds moved between the input and the output; copy reading: teacher-forced
              on copilot's own volume and pan edits, the numbers kept from the previous plan written right, and
              the best attention head's weight on them there (a copying head: far above uniform)
  describe    copilot renders described by the model: their sounds named in the caption [>= 70 %], sides and
              start times right for the sounds named
"""
import argparse
import contextlib
import functools
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model  # noqa: E402
import sample  # noqa: E402
from copilot import (BEDS, EVENTS, SOUND_CLASSES, TRAIN_SEEDS, OfflineCopilot, Renderer, Scene, SceneError,  # noqa
                     Sound, ambience_ids, caption_to_class, mix_scene, pan_gains, parse_scene, read_conversations,
                     scene_to_json, validate_scene)
from metrics import ild_db, plan_adherence  # noqa: E402
from tokenizer import DESCRIBE, SAMPLE_RATE, encode_conversation, task_turns  # noqa: E402

# Story prompts written for this probe, in free wording (not copilot's templates). Each names toy-world sounds:
# (class, side, level, start s); side "left" means panning <= -0.3, "right" >= 0.3, "centre" |panning| <= 0.15.
PROMPTS = [
    ("A thunderstorm at night: heavy rain, thunder, and a dog barking on the left.",
     [("rain",), ("thunder",), ("dog", "left")]),
    ("Rain on the windows while a phone rings somewhere to the right.", [("rain",), ("phone", "right")]),
    ("I want a cozy evening by the fireplace with a cat meowing.", [("fire",), ("cat",)]),
    ("Church bells over the sound of the sea.", [("bells",), ("waves",)]),
    ("A windy hill where birds sing on the right after two seconds.", [("wind",), ("birds", "right", None, 2.0)]),
    ("Somebody knocks at the door at the 1 second mark, while a fan hums.", [("knocking", None, None, 1.0), ("fan",)]),
    ("Just waves, and a loud siren passing on the left.", [("waves",), ("siren", "left", "loud")]),
    ("Gentle piano with quiet rain behind it.", [("piano",), ("rain", None, "quiet")]),
    ("Footsteps walking across the room, with the hum of a fan in the background.", [("footsteps",), ("fan",)]),
    ("A campfire crackling, and birds chirping on the left.", [("fire",), ("birds", "left")]),
    ("Make a scene with wind and a bell that rings at 3 seconds.", [("wind",), ("bells", None, None, 3.0)]),
    ("The ocean, with a dog far to the right.", [("waves",), ("dog", "right")]),
    ("Thunder rumbling, rain pouring, and a cat on the right.", [("thunder",), ("rain",), ("cat", "right")]),
    ("A quiet office with a fan running and a telephone that rings straight away.",
     [("fan",), ("phone", None, None, 0.0)]),
    ("Someone is knocking on the left while the fire crackles.", [("knocking", "left"), ("fire",)]),
    ("Rainy street with an ambulance siren on the right.", [("rain",), ("siren", "right")]),
    ("Birdsong by the sea.", [("birds",), ("waves",)]),
    ("A stormy night with strong wind and distant thunder.", [("wind",), ("thunder", None, "quiet")]),
    ("Soft piano music and a dog barking loudly.", [("piano", None, "quiet"), ("dog", None, "loud")]),
    ("Give me steps coming from the left and a cat meowing on the right, over the sound of rain.",
     [("footsteps", "left"), ("cat", "right"), ("rain",)]),
    ("Church bells ringing right away, fire in the background.", [("bells", None, None, 0.0), ("fire",)]),
    ("A phone rings on the left, then someone knocks on the right, in a quiet room with a fan.",
     [("phone", "left"), ("knocking", "right"), ("fan",)]),
    ("Wind, birds, and a faint siren.", [("wind",), ("birds",), ("siren", None, "quiet")]),
    ("A dog barks after one second and a cat answers after three seconds, with rain outside.",
     [("dog", None, None, 1.0), ("cat", None, None, 3.0), ("rain",)]),
    ("Ocean waves with a piano playing on the right side.", [("waves",), ("piano", "right")]),
    ("Heavy rain and a loud thunderclap.", [("rain",), ("thunder", None, "loud")]),
    ("A fireplace, footsteps, and a knock at the door.", [("fire",), ("footsteps",), ("knocking",)]),
    ("Windy weather with a church bell far to the left.", [("wind",), ("bells", "left")]),
    ("Birds in the middle and rain all around.", [("birds", "centre"), ("rain",)]),
    ("A siren starts two seconds in, centred, while waves crash.", [("siren", "centre", None, 2.0), ("waves",)]),
    ("Cat on the left, dog on the right, rain in the background.", [("cat", "left"), ("dog", "right"), ("rain",)]),
    ("The hum of a fan and a quiet piano.", [("fan",), ("piano", None, "quiet")]),
    ("A thunderclap at the start over steady wind.", [("thunder", None, None, 0.0), ("wind",)]),
    ("Crackling fire and a telephone to the right.", [("fire",), ("phone", "right")]),
    ("Footsteps at 2 seconds on the right over the ocean.", [("footsteps", "right", None, 2.0), ("waves",)]),
    ("Make it rain, and add church bells on the right.", [("rain",), ("bells", "right")]),
]
SIDE_OK = {"left": lambda p: p <= -0.3, "right": lambda p: p >= 0.3, "centre": lambda p: abs(p) <= 0.15}
LEVEL_OK = {"loud": lambda s: s.loudness >= SOUND_CLASSES[caption_to_class(s.text)].top - 4,
            "quiet": lambda s: s.loudness <= -22}
# Edit requests written for this probe ({x}: a sound's name, {y}: a sound asked for, {side}: left/right).
EDITS = {"remove": ("Please remove the {x}.", "I'd rather not hear the {x}.", "Drop the {x} from the scene."),
         "add": ("Could you also put {y} in?", "Add {y} on the {side}.", "Let's have {y} too."),
         "change": ("Swap out the {x} and use {y}.", "Put {y} where the {x} is.", "Replace the {x}: {y} instead."),
         "volume": ("The {x} is too quiet, turn it up.", "Make the {x} softer.", "Bring the {x} up a lot.",
                    "Turn the {x} down a bit."),
         "pan": ("Move the {x} over to the {side}.", "I want the {x} on the {side}.", "Pan the {x} to the {side}."),
         "open": ("Make the scene fuller, add a couple of sounds.", "Everything except the background should be "
                  "quieter.", "Delay the events by a second.", "Let the sounds be shorter.")}
OPEN_OP = {0: "busier", 1: "calmer", 2: "later", 3: "shorter"}
VOLUME_UP = (True, False, True, False)


def rate(hits: int, n: int) -> float | None:
    return hits / n if n else None


def write_plan(m, turns: list, opts) -> Scene | None:
    """The model's greedy text after `turns`, parsed as a scene as written (None: not a scene)."""
    try:
        return parse_scene(sample.decode_text(m, turns, opts.max_new_tokens)[0])
    except SceneError:
        return None


def probe_plans(m, items: list, opts) -> dict:
    """Rates of the plans' validity and of named sounds present and stated sides / levels / starts honoured; in
    "missed", each stated one not honoured: [prompt, sound class, what was stated, its value, the sound as written]."""
    c, missed = dict.fromkeys(("plans", "valid", "named", "present", "sides", "side_ok", "levels", "level_ok",
                               "starts", "start_ok"), 0), []
    for text, names in items:
        scene = write_plan(m, task_turns("story", instruction=text), opts)
        c["plans"] += 1
        c["valid"] += scene is not None and not validate_scene(scene)
        found = {}
        for s in scene.sounds if scene else []:
            found.setdefault(caption_to_class(s.text), s)
        for cls, side, level, start in (tuple(n) + (None,) * (4 - len(n)) for n in names):
            s = found.get(cls)
            c["named"], c["present"] = c["named"] + 1, c["present"] + (s is not None)
            for key, want, ok in (("sides", side, lambda: SIDE_OK[side](s.panning)),
                                  ("levels", level, lambda: LEVEL_OK[level](s)),
                                  ("starts", start, lambda: abs(s.start_time - start) <= 0.25)):
                if want is not None:
                    c[key] += 1
                    if s is not None and ok():
                        c[key[:-1] + "_ok"] += 1
                    else:
                        missed.append([text, cls, key[:-1], want, s and asdict(s)])
    return {"n": c["plans"], "valid": rate(c["valid"], c["plans"]), "present": rate(c["present"], c["named"]),
            "side": rate(c["side_ok"], c["sides"]), "level": rate(c["level_ok"], c["levels"]),
            "start": rate(c["start_ok"], c["starts"]), "counts": c, "missed": missed}


def forced(m, turns: list, text: str) -> tuple[torch.Tensor, int, torch.Tensor]:
    """`turns` as a prompt, then `text` teacher-forced as the model's turn -> (ids [T], the prompt's length, the
    final hidden states [T, hidden]; next_probs turns those the caller reads into next-token distributions)."""
    ex = encode_conversation(turns, m.tok, generation_prompt=True, audio_dim=m.sct.config.audio_dim)
    ids = torch.cat([ex.ids, torch.tensor(m.tok.encode(text), dtype=ex.ids.dtype)])
    spans = torch.cat([ex.span_ids, ex.span_ids.new_zeros(len(ids) - len(ex.ids))])
    _, h = m.sct._prefill([ids], [ex.latents], [spans], m.sct.config.num_hidden_layers, 0)
    return ids, len(ex.ids), m.sct.model.norm(h[0])


def next_probs(m, h: torch.Tensor) -> torch.Tensor:
    """[..., hidden] final hidden states -> [..., vocab] next-token distributions."""
    return m.sct.lm_logits(h).float().softmax(-1)


def next_token_probs(m, turns: list, prefix: str) -> torch.Tensor:
    """The plan writer's next-token distribution [vocab] after `turns` and the start of its own turn `prefix`."""
    return next_probs(m, forced(m, turns, prefix)[2][-1])


@functools.lru_cache
def side_pieces(tok) -> dict:
    """The ids of the tokenizer's number pieces on each side (SIDE_OK: left <= -0.3, right >= 0.3), read once."""
    values = {}
    for i in range(tok.vocab_size):
        try:
            values[i] = float(tok.decode([i]).strip())
        except ValueError:
            pass
    return {side: torch.tensor([i for i, v in values.items() if ok(v)], dtype=torch.long)
            for side, ok in SIDE_OK.items()}


def side_split(probs: torch.Tensor, tok) -> dict:
    """Next-token probability summed over the number pieces of each side."""
    return {side: probs[ids].sum().item() for side, ids in side_pieces(tok).items()}


def side_reading(m, items: list, opts) -> dict:
    """Does the plan writer read "on the left"? At the "panning": of each sound with a stated side in its own plan,
    the probability it puts on the stated side and on the other side (equal: the words are not read)."""
    stated, other = [], []
    for text, names in items:
        turns = task_turns("story", instruction=text)
        plan = sample.decode_text(m, turns, opts.max_new_tokens)[0]
        for cls, side, *_ in (n for n in names if len(n) > 1 and n[1] in ("left", "right")):
            at = [x.end() for x in re.finditer(r'"text":"([^"]*)"', plan) if caption_to_class(x.group(1)) == cls]
            if at and '"panning":' in plan[at[0]:]:
                mass = side_split(next_token_probs(m, turns, plan[:plan.index('"panning":', at[0]) + 10]), m.tok)
                stated.append(mass[side])
                other.append(mass["right" if side == "left" else "left"])
    return {"n": len(stated), "stated": sum(stated) / len(stated) if stated else None,
            "other": sum(other) / len(other) if other else None}


def event_scene(cls: str, bed: str, pan: float, start: float) -> tuple[str, Scene]:
    """A quiet bed and one event: the prompt and the plan."""
    b, e = SOUND_CLASSES[bed], SOUND_CLASSES[cls]
    sounds = [Sound(0, "sfx", b.caption, -30, 0, 0, 5), Sound(1, "sfx", e.caption, e.top - 2, pan, start, 1.5)]
    side = {-1.0: "hard left", 0.0: "in the middle", 1.0: "hard right"}[pan]
    text = f"{e.caption.capitalize()} {side} after {start:g} seconds, over {b.caption}."
    return text, Scene(f"{b.caption.capitalize()}, with {e.caption}.", sounds)


def measure(audio: torch.Tensor, scene: Scene, pan: float, start: float) -> dict:
    """metrics.plan_adherence of the event -> its measured onset (s) and ILD (dB, + = left), level error (LU), and
    whether the onset is within 0.25 s and the ILD on the planned side (> 3 dB left, < -3 dB right, |.| < 3 centred)."""
    m = plan_adherence(audio, scene)[0]
    if not m["heard"]:
        return dict(heard=False, onset=math.nan, ild=0.0, level_err=math.nan, onset_ok=False, side_ok=False)
    ild = m["ild"] + ild_db(*pan_gains(pan))                      # the error plus the pan law's ILD
    side = ild > 3 if pan < 0 else ild < -3 if pan > 0 else abs(ild) < 3
    return dict(heard=True, onset=start + m["onset"], ild=ild, level_err=m["level"], onset_ok=abs(m["onset"]) <= 0.25,
                side_ok=side)


def probe_audio(m, opts, seed: int) -> dict:
    rows = {"model": [], "copilot via VAE": []}
    swaps = {}
    for k, cls in enumerate(EVENTS):
        bed = BEDS[k % len(BEDS)]
        got = []
        for pan, start in ((-1.0, 1.0), (1.0, 3.0), (0.0, 2.0)):
            text, scene = event_scene(cls, bed, pan, start)
            plan = sample.accept_plan(scene_to_json(scene), None)
            reply = sample.respond(m, [], "story", {"instruction": text}, None, opts,
                                   torch.Generator().manual_seed(seed), plan=plan)
            mix = mix_scene(scene, Renderer(seed=f"probe|{cls}|{pan}|{start}")).audio
            with torch.no_grad():
                ref = m.vae.decode(m.encode(mix)[None], mix.shape[-1])[0].cpu()
            for row, audio in (("model", reply.audio), ("copilot via VAE", ref)):
                rows[row].append(dict(cls=cls, pan=pan, start=start, **measure(audio, scene, pan, start)))
            got.append(rows["model"][-1])
        a, b = got[0], got[1]                       # the same seed, left at 1 s -> right at 3 s
        swaps[cls] = bool(b["onset"] - a["onset"] > 1.0 and a["ild"] > b["ild"] + 6)   # NaN (unheard): False
    out = {}
    for row, r in rows.items():
        finite = [x for x in r if x["heard"]]
        out[row] = {"n": len(r), "onset": rate(sum(x["onset_ok"] for x in r), len(r)),
                    "ild_sign": rate(sum(x["side_ok"] for x in r), len(r)),
                    "level_err": sum(abs(x["level_err"]) for x in finite) / max(1, len(finite))}
    out["swap"] = {"followed": sum(swaps.values()), "classes": len(swaps), "per_class": swaps}
    out["rows"] = rows
    return out


def same(a: Sound, b: Sound) -> bool:
    return a.text == b.text and a.mix_params() == b.mix_params()


def edit_right(kind: str, old: Scene, new: Scene | None, target: Sound | None, want: dict) -> bool:
    """The asked change and no other (ids kept, every other sound's caption and mix unchanged)."""
    if new is None or validate_scene(new, old):
        return False
    o, n = old.by_id(), new.by_id()
    kept = [i for i in o if i in n]
    untouched = lambda ids: all(same(o[i], n[i]) for i in ids)
    added = [n[i] for i in n if i not in o]
    classes = lambda sounds: [caption_to_class(s.text) for s in sounds]
    others = [i for i in o if target is None or i != target.id]
    if kind == "remove":
        return target.id not in n and len(n) == len(o) - 1 and untouched(others)
    if kind == "add":
        ok_side = want.get("side") is None or (added and SIDE_OK[want["side"]](added[0].panning))
        return len(kept) == len(o) and untouched(kept) and classes(added) == [want["cls"]] and ok_side
    if kind == "change":
        return target.id not in n and untouched(others) and len(kept) == len(others) and classes(added) == [want["cls"]]
    if kind in ("volume", "pan"):
        if added or len(kept) != len(o) or not untouched(others) or n[target.id].text != target.text:
            return False
        s = n[target.id]
        if kind == "volume":
            return (s.loudness - target.loudness) * (1 if want["up"] else -1) >= 2
        return SIDE_OK[want["side"]](s.panning) and s.panning != target.panning
    op, amb = want["op"], set(ambience_ids(old)[:1])
    fg = [i for i in o if i not in amb]
    if op == "busier":
        return len(added) >= 1 and len(kept) == len(o) and untouched(kept)
    if added or len(kept) != len(o) or not untouched(amb):
        return False
    attr, sign = {"calmer": ("loudness", -1), "later": ("start_time", 1), "shorter": ("duration", -1)}[op]
    moved = [(getattr(n[i], attr) - getattr(o[i], attr)) * sign for i in fg]
    return all(d >= 0 for d in moved) and any(d > 0 for d in moved)


def probe_edits(m, opts, seed: int, n_bases: int, audio_every: int) -> dict:
    right, total, kept_db, ref_db = {}, {}, [], []
    for b in range(n_bases):
        rng = random.Random(f"probe-edit|{b}")
        text, _, old = OfflineCopilot().conversation(rng.choice(TRAIN_SEEDS), rng, 1, kinds=["add"])[0]   # two events
        audio = mix_scene(old, Renderer(seed=f"probe-edit|{b}")).audio
        history = task_turns("story", instruction=text, plan=scene_to_json(old), audio=m.encode(audio))
        fg = [s for s in old.sounds if s.id not in ambience_ids(old)[:1]]
        present = {caption_to_class(s.text) for s in old.sounds}
        for kind, wordings in EDITS.items():
            j = (b + len(kind)) % len(wordings)
            target = rng.choice(fg)
            x = rng.choice(SOUND_CLASSES[caption_to_class(target.text)].names.split("|"))
            new_cls = rng.choice([c for c in EVENTS if c not in present])
            y = rng.choice(SOUND_CLASSES[new_cls].nouns.split("|"))
            side = "left" if target.panning > 0 else "right"
            want = {"cls": new_cls, "side": side if "{side}" in wordings[j] else None, "up": VOLUME_UP[j % 4],
                    "op": OPEN_OP[j % 4]}
            instruction = wordings[j].format(x=x, y=y, side=side)
            new = write_plan(m, history + task_turns("story", instruction=instruction), opts)
            ok = edit_right(kind, old, new, None if kind in ("add", "open") else target, want)
            right[kind], total[kind] = right.get(kind, 0) + ok, total.get(kind, 0) + 1
            if ok and b % audio_every == 0:                # the audio: how far the kept sounds moved
                reply = sample.respond(m, history, "story", {"instruction": instruction}, old, opts,
                                       torch.Generator().manual_seed(seed), plan=sample.accept_plan(
                                           scene_to_json(new), old))
                ref = mix_scene(new, Renderer(seed=f"probe-edit|{b}")).audio
                for out, acc in ((reply.audio, kept_db), (ref, ref_db)):
                    acc += kept_change(audio, out, old, new)
    per_kind = {k: rate(right[k], total[k]) for k in EDITS}
    return {"per_kind": per_kind, "n": total, "kept_db": median(kept_db), "kept_db_copilot": median(ref_db)}


@contextlib.contextmanager
def recorded_attention():
    """While inside: the weights [heads, queries, keys] of every model.attend call (the first row), in call order
    (layer by layer for a prefill); the outputs are model.attend's own. For the bool masks of the sdpa path."""
    weights, attend = [], model.attend

    def recording(q, k, v, mask, scale, cap, impl):
        weights.append(model.attention_weights(q, k, mask, scale, cap)[0])
        return attend(q, k, v, mask, scale, cap, impl)
    model.attend = recording
    try:
        yield weights
    finally:
        model.attend = attend


def number_pieces(m, text: str, scene: Scene) -> dict:
    """(sound id, key) -> index of the token that starts that number in tok.encode(text), for the numbers that start
    a token (the toy's are whole pieces); the scene is `text` parsed."""
    ids, at = m.tok.encode(text), {}
    starts = {len(m.tok.decode(ids[:i])): i for i in range(len(ids))}
    for s in scene.sounds:
        obj = text.rfind('{"tool"', 0, text.index(f'"id":{s.id}}}'))
        for key in ("loudness", "panning", "start_time", "duration"):
            if (c := text.index(f'"{key}":', obj) + len(key) + 3) in starts:
                at[s.id, key] = starts[c]
    return at


@torch.no_grad()
def copy_reading(m, n: int = 12) -> dict:
    """Does the edit writer copy? Teacher-forced on copilot's own volume and pan edits of a rendered story
    (sample.py's layout): at each number the edit keeps from the previous plan, whether the model's most likely
    next token is its first piece, that piece's probability, and the attention of every text layer's heads from
    that position to the same number in the previous plan (a copying head attends there; uniform attention gives
    it 1 / the positions seen)."""
    right, prob, hits, uniform = [], [], [], []
    for i in range(n):
        rng = random.Random(f"probe-copy|{i}")
        turns = OfflineCopilot().conversation(rng.choice(TRAIN_SEEDS), rng, 2, kinds=[("volume", "pan")[i % 2]])
        (_, _, old), (instruction, _, new) = turns
        before, after = scene_to_json(old), scene_to_json(new)
        history = task_turns("story", instruction=turns[0][0], plan=before,
                             audio=m.encode(mix_scene(old, Renderer(seed=f"probe-copy|{i}")).audio))
        with recorded_attention() as weights:
            ids, start, h = forced(m, history + task_turns("story", instruction=instruction), after)
        plan_ids, prompt = m.tok.encode(before), ids[:start].tolist()
        source = next(j for j in range(len(prompt)) if prompt[j:j + len(plan_ids)] == plan_ids)
        was, now, o, w = number_pieces(m, before, old), number_pieces(m, after, new), old.by_id(), new.by_id()
        for (sid, key), j in now.items():
            if sid in o and (sid, key) in was and getattr(o[sid], key) == getattr(w[sid], key):
                q, src = start + j - 1, source + was[sid, key]           # the position that writes it; the original
                probs = next_probs(m, h[q])
                right.append(int(probs.argmax()) == int(ids[q + 1]))
                prob.append(float(probs[ids[q + 1]]))
                hits.append(torch.stack([a[:, q, src] for a in weights]))
                uniform.append(1 / (q + 1))
    attention = torch.stack(hits).mean(0)                                 # [layers, heads]
    layer, head = divmod(int(attention.argmax()), attention.shape[1])
    return {"n": len(right), "right": rate(sum(right), len(right)), "p": sum(prob) / len(prob),
            "attention": float(attention.max()), "head": [layer, head], "uniform": sum(uniform) / len(uniform),
            "per_head": attention.tolist()}


def median(xs: list) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


def kept_change(before: torch.Tensor, after: torch.Tensor, old: Scene, new: Scene) -> list[float]:
    """|dB change| of each channel's power over each kept event's interval, away from every edited sound."""
    o, n = old.by_id(), new.by_id()
    edited = [s for s in old.sounds + new.sounds if s.id not in n or s.id not in o or not same(o[s.id], n[s.id])]
    out = []
    for s in new.sounds:
        if s.id in ambience_ids(new)[:1] or any(e.id == s.id for e in edited):
            continue
        if any(e.start_time < s.end and s.start_time < e.end for e in edited):
            continue
        a, b = (int(t * SAMPLE_RATE) for t in (s.start_time, s.end))
        n = min(before.shape[-1], after.shape[-1], b)
        if n - a < SAMPLE_RATE // 10:
            continue
        p0, p1 = before[:, a:n].pow(2).mean(-1), after[:, a:n].pow(2).mean(-1)
        out += (10 * torch.log10((p1 + 1e-12) / (p0 + 1e-12))).abs().tolist()
    return out


def probe_describe(m, opts, n: int) -> dict:
    c = dict.fromkeys(("sounds", "named", "sides", "side_ok", "starts", "start_ok"), 0)
    for k in range(n):
        rng = random.Random(f"probe-describe|{k}")
        _, _, scene = OfflineCopilot().conversation(rng.choice(TRAIN_SEEDS), rng, 1)[0]
        audio = mix_scene(scene, Renderer(seed=f"probe-describe|{k}")).audio
        caption = write_plan(m, task_turns("understand", clip=m.encode(audio), request=DESCRIBE), opts)
        said = {}
        for s in caption.sounds if caption else []:
            said.setdefault(caption_to_class(s.text), s)
        for s in scene.sounds:
            c["sounds"] += 1
            got = said.get(caption_to_class(s.text))
            c["named"] += got is not None
            if got is not None and s.id not in ambience_ids(scene)[:1]:
                truth = "left" if s.panning <= -0.3 else "right" if s.panning >= 0.3 else "centre"
                c["sides"], c["starts"] = c["sides"] + 1, c["starts"] + 1
                c["side_ok"] += SIDE_OK[truth](got.panning)
                c["start_ok"] += abs(got.start_time - s.start_time) <= 0.5
    return {"n": n, "recall": rate(c["named"], c["sounds"]), "side": rate(c["side_ok"], c["sides"]),
            "start": rate(c["start_ok"], c["starts"]), "counts": c}


def fmt_db(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:5.1f} %"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt-dir", default="checkpoints/toy", help="tokenizer.model, vae.pt and sct.pt")
    p.add_argument("--data", type=Path, default=None, help="a copilot dataset: its eval split's turn-0 prompts too")
    p.add_argument("--steps", type=int, default=sample.Options.steps, help="DPM-Solver++ steps (sample.py's default)")
    p.add_argument("--cfg", type=float, default=sample.Options.cfg, help="CFG weight (sample.py's default)")
    p.add_argument("--seed", type=int, default=0, help="diffusion noise seed")
    p.add_argument("--edit-bases", type=int, default=6, help="base scenes for the edit section (6 kinds each)")
    p.add_argument("--describe", type=int, default=20, help="copilot renders to describe")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    m = sample.load_models(a.ckpt_dir)
    opts = replace(sample.Options(), steps=a.steps, cfg=a.cfg)
    t0, res = time.time(), {"ckpt_dir": str(a.ckpt_dir), "steps": a.steps, "cfg": a.cfg}
    with torch.no_grad():
        res["plans"] = probe_plans(m, PROMPTS, opts)
        res["side_reading"] = side_reading(m, PROMPTS, opts)
        if a.data is not None:
            items = [(c.turns[0].instruction, [(caption_to_class(s.text),) for s in c.turns[0].scene.sounds])
                     for c in read_conversations(a.data, "eval")]
            res["plans_eval"] = probe_plans(m, items, opts)
        res["audio"] = probe_audio(m, opts, a.seed)
        res["edits"] = probe_edits(m, opts, a.seed, a.edit_bases, 2)
        res["copy_reading"] = copy_reading(m)
        res["describe"] = probe_describe(m, opts, a.describe)
    res["seconds"] = time.time() - t0
    P, S, A, E, D = res["plans"], res["side_reading"], res["audio"], res["edits"], res["describe"]
    lines = [f"probe of {a.ckpt_dir} ({a.steps} steps, CFG {a.cfg:g}; {res['seconds']:.0f} s)",
             f"plans, {P['n']} free prompts: valid {pct(P['valid'])} | named present {pct(P['present'])} | "
             f"sides {pct(P['side'])} | levels {pct(P['level'])} | starts {pct(P['start'])}",
             f"plans, side reading at \"panning\" ({S['n']} sounds with a stated side): probability on the stated "
             f"side {pct(S['stated'])} | on the other {pct(S['other'])}"]
    if "plans_eval" in res:
        Q = res["plans_eval"]
        lines.append(f"plans, {Q['n']} eval turn-0 prompts: valid {pct(Q['valid'])} | named present "
                     f"{pct(Q['present'])}")
    for row in ("model", "copilot via VAE"):
        r = A[row]
        lines.append(f"audio ({row}), {r['n']} single-event scenes: onset within 0.25 s {pct(r['onset'])} | ILD sign "
                     f"{pct(r['ild_sign'])} | mean |level error| {r['level_err']:.1f} dB")
    lines.append(f"swap test: followed in {A['swap']['followed']} of {A['swap']['classes']} classes")
    lines.append("edits right: " + " | ".join(f"{k} {pct(v)}" for k, v in E["per_kind"].items()) +
                 f"; kept sounds moved {fmt_db(E['kept_db'])} dB "
                 f"(copilot: {fmt_db(E['kept_db_copilot'])})")
    C = res["copy_reading"]
    lines.append(f"edits, copy reading at a kept number ({C['n']} numbers): written {pct(C['right'])} | probability "
                 f"{pct(C['p'])} | best head's attention to it {C['attention']:.4f} (layer {C['head'][0]}, head "
                 f"{C['head'][1]}; uniform {C['uniform']:.4f})")
    lines.append(f"describe, {D['n']} renders: sounds named {pct(D['recall'])} | sides {pct(D['side'])} | "
                 f"starts {pct(D['start'])}")
    print("\n".join(lines))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
