"""The AudioChat command line: storytelling, editing, understanding and multi-turn chat (paper section 3.1).

    python sample.py --prompt "rain on a tin roof, a dog barks twice on the left"  # -> out/sample.wav + .json
    python sample.py --audio in.wav --prompt "remove the dog"     # edit a clip (Eq. 2)
    python sample.py --audio in.wav                               # describe it: out/caption.json
    python sample.py --chat                                       # multi-turn on stdin (Eq. 3)
    python sample.py --plan plan.json                             # render a plan you wrote
    python sample.py --prompt "..." --plot                        # + out/sample.png: spectrograms and the plan

From a prompt to the WAV (respond, appendix D): the request is laid out as in training (tokenizer.task_turns);
SCT.generate decodes the model's text greedily until <unused0> (the audio starts), <end_of_turn> or <eos>;
accept_plan checks it (repairing an invalid plan, and saying how) and its canonical JSON goes into the context;
sample_latents draws the plan's latent frames with DPM-Solver++(2M) and CFG; the VAE decodes them to 48 kHz
stereo. One seed, one audio. A chat too long for the SCT loses its oldest exchange (the plan carries the story).
Flags, files, input audio (README) and checkpoints are checked before any work, --out before any write; main()
catches this project's errors only. bench/eval_split.py answers a whole eval split in metrics.py's layout.

Tests: python -m pytest -q tests/test_sample.py tests/test_end_to_end.py
"""
import argparse
import hashlib
import math
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from copilot import MAX_END, MAX_SOUNDS, MAX_START, Scene, SceneError, parse_scene, scene_diff, scene_to_json, \
    validate_scene
from diffusion import DiffusionConfig, guided, sample
from model import SCT
from tokenizer import (DESCRIBE, SAMPLE_RATE, AudioError, CheckpointError, StereoVAE, TextTokenizer, Turn,
                       encode_conversation, load_audio, load_checkpoint, load_model, save_audio, task_turns,
                       write_atomic)


class SampleError(Exception):
    """A request sample.py cannot serve; the message names the problem and the fix."""


class ContextFull(SampleError):
    """The conversation no longer fits in the sequence length the model was trained with."""


def say(msg: str) -> None:                      # notes and errors on stderr, kept clear of the progress bar
    tqdm.write(msg, file=sys.stderr)


# -----------------------------------------------------------------------------
# Inputs: the checkpoints of one training run, checked to belong together, and audio clips

@dataclass
class Models:
    tok: TextTokenizer
    vae: StereoVAE      # float32 always: it decodes the waveform
    sct: SCT            # bfloat16 on CUDA, float32 elsewhere
    max_len: int        # longest sequence (context + plan + audio frames) the SCT was trained with
    device: torch.device

    def encode(self, audio: torch.Tensor) -> torch.Tensor:    # [2, S] at 48 kHz -> normalised latents [F, audio_dim]
        return self.vae.encode(audio[None].to(self.device))[0]


def load_models(ckpt_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Models:
    """tokenizer.model, vae.pt and sct.pt of one training run (sct.pt's "trained_with" names the other two)."""
    d, names = Path(ckpt_dir), ("tokenizer.model", "vae.pt", "sct.pt")
    if missing := [n for n in names if not (d / n).is_file()]:
        raise SampleError(f"--ckpt-dir {d} lacks {', '.join(missing)}; train the toy model with "
                          f"`python train.py --preset toy`, or pass the folder holding {', '.join(names)}")
    tok, vae = TextTokenizer(d / "tokenizer.model"), load_model(StereoVAE, d / "vae.pt", device)
    sct = load_model(SCT, d / "sct.pt", device, ckpt := load_checkpoint(d / "sct.pt", "sct")).to(dtype)
    have = {"tokenizer_vocab_size": tok.vocab_size, "vae_audio_dim": vae.audio_dim} | {   # named as in trained_with
        f"{n.split('.')[0]}_sha256": hashlib.sha256((d / n).read_bytes()).hexdigest() for n in names[:2]}
    if bad := [f"{k}: sct.pt was trained with {v}, {d} has {have[k]}"
               for k, v in {"vae_audio_dim": sct.config.audio_dim, **ckpt.get("trained_with", {})}.items()
               if have.get(k, v) != v]:
        raise SampleError(f"the checkpoints in {d} do not belong together:\n  " + "\n  ".join(bad) +
                          "\nKeep the files of one training run together, or retrain: `python train.py --preset toy`")
    seq_len = ckpt.get("train_config", {}).get("sct", {}).get("seq_len")
    return Models(tok, vae, sct, int(seq_len or sct.config.max_position_embeddings), torch.device(device))


def read_audio(path: str | Path, trim: bool = False) -> torch.Tensor:
    """An input clip [2, S] at 48 kHz by the README's rules (tokenizer.load_audio), at most MAX_END s unless trim."""
    audio = load_audio(path)
    if (seconds := audio.shape[1] / SAMPLE_RATE) > MAX_END and not trim:
        raise SampleError(f"{path}: {seconds:.2f} s of audio, but the model reads clips of at most {MAX_END:g} s (no "
                          f"scene it was trained on is longer); cut it, or pass --trim to keep the first {MAX_END:g} s")
    if seconds > MAX_END:
        say(f"note: {path} is {seconds:.2f} s long; --trim keeps its first {MAX_END:g} s")
    return audio[:, : int(MAX_END * SAMPLE_RATE)]


# -----------------------------------------------------------------------------
# One model turn: its text (a caption, a plan) decoded greedily and checked, then the plan's audio span

@dataclass
class Checked:
    scene: Scene        # what goes into the context and gets rendered
    valid: bool         # the scene as written passed validate_scene
    notes: list[str]    # its violations, the repairs made, and what is left


def accept_plan(text: str, previous: Scene | None, what: str = "plan") -> Checked:
    """Parse and validate a scene (against `previous` for an edit); repair an invalid one, noting each fault and fix."""
    try:
        scene = parse_scene(text)
    except SceneError as e:
        raise SampleError(f"the {what} is not a scene ({e}); the raw text was:\n{text}") from e
    if len(scene.sounds) > MAX_SOUNDS:
        raise SampleError(f"the {what} has {len(scene.sounds)} sounds; a scene holds at most {MAX_SOUNDS} sounds "
                          f"(copilot.MAX_SOUNDS, as in training): split it or leave some out")
    if not (violations := validate_scene(scene, previous)):
        return Checked(scene, True, [])
    sounds = []
    for s in scene.sounds:                          # every number into its range, and the end at most MAX_END
        start = min(max(s.start_time, 0.0), MAX_START)
        sounds.append(replace(s, loudness=min(max(s.loudness, -30.0), -10.0), panning=min(max(s.panning, -1.0), 1.0),
                              start_time=start, duration=min(max(s.duration, 0.1), MAX_END - start)))
    fixes = [f"sound {s.id}: {k} {getattr(s, k)} -> {getattr(new, k)}" for s, new in zip(scene.sounds, sounds)
             for k in ("loudness", "panning", "start_time", "duration") if getattr(s, k) != getattr(new, k)]
    edit = scene_diff(previous, Scene(scene.description, sounds))
    fixes += [f"{k} {getattr(scene, k)} -> {v}" for k, v in edit.items() if getattr(scene, k) != v]
    fixed = Scene(scene.description, sounds, **edit)
    return Checked(fixed, False, [f"{what} invalid: {v}" for v in violations] + [f"{what} repaired: {r}" for r in fixes]
                   + [f"{what} left as written: {v}" for v in validate_scene(fixed, previous)])


@dataclass
class Options:
    steps: int = 150             # DPM-Solver++(2M) steps (appendix D: 150)
    cfg: float = 3.0             # CFG weight (appendix D: 3.0; 1 = no guidance)
    max_new_tokens: int = 2048   # most text tokens per model turn (caption + plan)


@dataclass
class Reply:
    caption: Checked | None         # the caption of the user's clip (upload_edit, understand)
    plan: Checked | None            # the plan (story, upload_edit)
    latents: torch.Tensor | None    # [F, audio_dim] the generated span
    audio: torch.Tensor | None      # [2, S] at 48 kHz, S = plan duration * SAMPLE_RATE
    seconds: dict                   # wall time per phase: plan, diffusion, vae
    notes: list[str]

    @property
    def parts(self) -> dict:        # the model turn's parts as task_turns names them: canonical text, the audio
        text = {k: scene_to_json(c.scene) for k, c in (("caption", self.caption), ("plan", self.plan)) if c}
        return {**text, "audio": self.latents}


def request(history: list[Turn], task: str, user: dict) -> list[Turn]:
    """What the model is asked: the conversation so far, then the user turn of `task` (tokenizer.TASK_LAYOUTS)."""
    return history + task_turns(task, **user)


def decode_text(m: Models, turns: list[Turn], max_new_tokens: int) -> tuple[str, int | None]:
    """Greedy text of the model turn that follows `turns` -> (text, the stop id or None at the token limit)."""
    ex = encode_conversation(turns, m.tok, generation_prompt=True, audio_dim=m.sct.config.audio_dim)
    if (room := m.max_len - len(ex.ids)) < 2:
        raise ContextFull(f"the conversation is {len(ex.ids)} tokens; the model was trained on at most {m.max_len}")
    stops = (m.tok.audio_start_id, m.tok.end_of_turn_id, m.tok.eos_id)
    new = m.sct.generate([ex.ids], [ex.latents], [ex.span_ids], min(max_new_tokens, room), stops)[0].tolist()
    stop = new.pop() if new and new[-1] in stops else None
    return m.tok.decode(new), stop


def _span_prefix(m: Models, turns: list[Turn]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay out turns whose last part is an audio span; cut where its frames begin -> (ids, latents, span ids)."""
    ex = encode_conversation(turns, m.tok)
    start = int((ex.span_ids == ex.span_ids.max()).nonzero()[0])
    return ex.ids[:start], ex.latents[: int((ex.span_ids[:start] > 0).sum())], ex.span_ids[:start]


def sample_latents(m: Models, turns: list[Turn], opts: Options, generator: torch.Generator) -> torch.Tensor:
    """The audio span that ends `turns` (its latents a placeholder: only their count F is read) -> clean latents
    [F, audio_dim], drawn with CFG against the unconditional prefix <bos><start_of_turn>model\\n<unused0>."""
    F, D = turns[-1].parts[-1].shape
    cond, uncond = _span_prefix(m, turns), _span_prefix(m, [Turn("model", [turns[-1].parts[-1]])])
    if len(cond[0]) + F + 1 > m.max_len:
        raise ContextFull(f"context {len(cond[0])} tokens + {F} audio frames exceed the {m.max_len} trained on")
    cache = m.sct.prefix_cache(*map(list, zip(cond, uncond)), num_frames=F)   # rows: conditional, unconditional
    return sample(guided(lambda x, t: m.sct.denoise_step(cache, x, t).float(), opts.cfg), (1, F, D),
                  DiffusionConfig(steps=opts.steps, cfg_weight=opts.cfg), generator, m.device, progress=True)[0]


def respond(m: Models, history: list[Turn], task: str, user: dict, previous: Scene | None, opts: Options,
            generator: torch.Generator, plan: Checked | None = None) -> Reply:
    """The model turn after `history` and the user turn of `task`: "story" (plan, audio), "upload_edit" (caption
    of the user's clip, plan, audio) or "understand" (caption). A given `plan` (--plan) skips text decoding."""
    t0, caption, notes = time.perf_counter(), None, []
    if plan is None:
        text, stop = decode_text(m, request(history, task, user), opts.max_new_tokens)
        if not text.strip():                        # a toy model does this for short, vague instructions
            raise SampleError("the model ended its turn without writing anything; it learned from instructions that "
                              'name their sounds: name the ones you want, e.g. "rain on a tin roof, a dog on the left"')
        if stop is None or (stop == m.tok.audio_start_id) == (task == "understand"):   # not ended as trained
            notes.append(f"the model's turn hit --max-new-tokens {opts.max_new_tokens}" if stop is None else
                         "the model started an audio span after the caption; a description has no audio, so it was "
                         "dropped" if task == "understand" else "the model ended its turn without starting the "
                         "audio; the audio is made from its plan anyway")
        if task == "upload_edit":                   # the caption of the user's clip, a newline, then the plan
            first, newline, text = text.partition("\n")
            if not newline:
                raise SampleError(f"expected the caption JSON, a newline and the plan JSON; the raw text was:\n{first}")
            caption = accept_plan(first, None, "caption")
        if task == "understand":
            caption = accept_plan(text, None, "caption")
        else:
            plan = accept_plan(text, caption.scene if caption else previous)
    reply = Reply(caption, plan, None, None, {"plan": time.perf_counter() - t0},
                  notes + [n for c in (caption, plan) if c is not None for n in c.notes])
    if plan is None:
        return reply
    if (frames := plan.scene.num_frames(m.vae.config.frame_rate)) == 0:
        raise SampleError(f"the plan has no sound, so there is no audio to make:\n{scene_to_json(plan.scene)}")
    t1 = time.perf_counter()
    reply.latents = sample_latents(m, request(history, task, {**user, **reply.parts, "audio": torch.zeros(
        frames, m.sct.config.audio_dim)}), opts, generator)
    t2 = time.perf_counter()
    reply.audio = m.vae.decode(reply.latents[None].float(), round(plan.scene.duration * SAMPLE_RATE))[0].cpu()
    reply.seconds.update(diffusion=t2 - t1, vae=time.perf_counter() - t2)
    if not torch.isfinite(reply.audio).all():
        raise SampleError(f"the model made {int((~torch.isfinite(reply.audio)).sum())} NaN or infinite samples; "
                          f"nothing is written (the checkpoints may be broken: retrain, or try another --seed)")
    if (peak := reply.audio.abs().max().item()) > 1:                # a WAV holds full scale: never write clipping
        reply.audio *= 0.99 / peak
        reply.notes.append(f"the audio peaked at {20 * math.log10(peak):+.1f} dBFS; scaled down to -0.1 dBFS")
    return reply


def respond_in_context(m: Models, history: list[Turn], task: str, user: dict, previous: Scene | None, opts: Options,
                       seed: int) -> tuple[Reply, list[Turn]]:
    """respond() after as much of `history` as fits the model -> (reply, the history used)."""
    while True:
        try:
            return respond(m, history, task, user, previous, opts, torch.Generator().manual_seed(seed)), history
        except ContextFull as e:
            if not history:
                raise
            say(f"note: {e}; dropping the oldest exchange from the context (the previous plan carries the story)")
            history = history[2:]


# -----------------------------------------------------------------------------
# Outputs, the chat and the command line

def report(reply: Reply, out: Path, plot: bool = False) -> None:
    """Notes to stderr, scenes to stdout; the audio to `out` with its plan (.json), caption (.caption.json) and
    picture (.png) beside it, or, describing a clip, the caption to `out`."""
    for note in reply.notes:
        say(f"note: {note}")
    paths = {"plan": out.with_suffix(".json"), "caption": out.with_suffix(".caption.json") if reply.plan else out}
    scenes = {name: scene_to_json(c.scene) for name, c in (("caption", reply.caption), ("plan", reply.plan)) if c}
    print("\n".join(f"{name}:\n{text}" for name, text in scenes.items()))
    if reply.plan:
        save_audio(out, reply.audio)
        if plot:
            plot_scene(out.with_suffix(".png"), reply.audio, reply.plan.scene)
    for name, text in scenes.items():
        write_atomic(paths[name], lambda tmp: Path(tmp).write_text(text + "\n"))
    s, made = reply.seconds, [out] + [out.with_suffix(".png")] * plot if reply.plan else []    # the audio, its picture
    say(f"wrote {', '.join(map(str, made[:1] + [paths[n] for n in scenes] + made[1:]))}" + (
        f" ({reply.audio.shape[1] / SAMPLE_RATE:.2f} s of audio); plan {s['plan']:.1f} s, diffusion "
        f"{s['diffusion']:.1f} s, VAE {s['vae']:.1f} s" if reply.plan else ""))


def plot_scene(path, audio: torch.Tensor, scene: Scene) -> None:
    """--plot: each channel's spectrogram with the plan's sounds as labelled boxes, brighter where they are panned."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SampleError("--plot needs matplotlib (optional): `pip install matplotlib`, or leave out --plot") from e
    plt.switch_backend("Agg")                       # files only: no display needed
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for c, ax in enumerate(axes):
        spec = torch.stft(audio[c], 2048, 512, window=torch.hann_window(2048), return_complex=True).abs().pow(2)
        ax.imshow((db := 10 * torch.log10(spec + 1e-10)).numpy(), origin="lower", aspect="auto", cmap="magma",
                  vmin=float(db.max()) - 80, extent=(0, audio.shape[1] / SAMPLE_RATE, 0, SAMPLE_RATE / 2000))
        ax.set_ylabel(f"{('left', 'right')[c]} (kHz)")
        for k, s in enumerate(scene.sounds):        # side: the share of the sound in this channel
            side, y = (1 + (2 * c - 1) * s.panning) / 2, 20 * (0.08 + 0.84 * k / max(1, len(scene.sounds)))
            ax.add_patch(plt.Rectangle((s.start_time, y), s.duration, 2, fill=False, lw=1.5, color="cyan",
                                       alpha=0.3 + 0.7 * side))
            ax.text(s.start_time + 0.03, y + 0.4, f"{s.id}: {s.text} ({s.loudness:g} dB, pan {s.panning:g})",
                    fontsize=7, color="white", alpha=0.4 + 0.6 * side)
    axes[0].set_title(scene.description, fontsize=9)
    axes[1].set_xlabel("time (s)")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def run_chat(m: Models, args: argparse.Namespace, opts: Options, lines=None) -> None:
    """--chat: a user turn per line; /load FILE, /undo, /quit. Turn k -> OUT/turn{k}.wav and .json."""
    out, history, previous, clip, undo = Path(args.out), [], None, None, []    # undo: the state before each turn
    say("chat: type an instruction; /load FILE brings in audio to edit, /undo drops the last turn, /quit ends")
    for line in map(str.strip, sys.stdin if lines is None else lines):
        if line in ("/quit", "/exit"):
            break
        if line == "/undo" and undo:
            history, previous, clip = undo.pop()
            for suffix in (".wav", ".json", ".caption.json", ".png"):
                (out / f"turn{len(undo)}{suffix}").unlink(missing_ok=True)
            say(f"removed turn {len(undo)}")
        elif line == "/undo":
            say("nothing to undo")
        elif line.startswith("/load"):
            try:
                clip = m.encode(read_audio(line[5:].strip(), args.trim))
                say(f"loaded {line[5:].strip()}; your next instruction edits it")
            except (AudioError, SampleError) as e:
                say(f"error: {e}")
        elif line.startswith("/"):
            say(f"unknown command {line.split()[0]}; use /load FILE, /undo or /quit")
        elif line:
            task, user = ("story", {"instruction": line}) if clip is None else \
                ("upload_edit", {"clip": clip, "instruction": line})
            try:
                reply, context = respond_in_context(m, history, task, user, previous, opts, args.seed + len(undo))
            except SampleError as e:                # no usable plan, a turn too long for the model, non-finite audio
                say(f"error: {e}")
                continue
            report(reply, out / f"turn{len(undo)}.wav", args.plot)
            undo.append((history, previous, clip))
            history, previous, clip = context + task_turns(task, **user, **reply.parts), reply.plan.scene, None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="AudioChat: tell, edit and describe audio stories (module docstring).")
    g = p.add_argument_group("what to do (one mode)")
    g.add_argument("--prompt", help="the instruction: a story to tell, or with --audio the edit to make")
    g.add_argument("--audio", help="an audio file (<= 8 s; README: audio input): edited with --prompt, else described")
    g.add_argument("--chat", action="store_true", help="multi-turn session on stdin (/load FILE, /undo, /quit)")
    g.add_argument("--plan", help="render this scene JSON file instead of decoding a plan (--prompt: the instruction)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="WAV/FLAC path (default out/sample.wav), caption JSON path for --audio alone "
                                 "(default out/caption.json), or a folder for --chat (default out/chat)")
    g.add_argument("--trim", action="store_true", help="keep the first 8 s of longer input audio, not refuse it")
    g.add_argument("--plot", action="store_true", help="also write OUT.png: each channel's spectrogram with the "
                                                       "plan's sounds as labelled boxes (needs matplotlib)")
    g = p.add_argument_group("sampling (defaults: paper appendix D)")
    g.add_argument("--seed", type=int, default=0, help="diffusion noise seed, 0 to 2^32 - 1: one seed, one audio")
    g.add_argument("--steps", type=int, default=Options.steps, help="DPM-Solver++(2M) steps, 1 to 1000")
    g.add_argument("--cfg", type=float, default=Options.cfg, help="classifier-free guidance weight, 0 to 20 (1 = none)")
    g.add_argument("--max-new-tokens", type=int, default=Options.max_new_tokens, help="most text tokens per turn")
    g = p.add_argument_group("model")
    g.add_argument("--ckpt-dir", default="checkpoints/toy", help="folder with tokenizer.model, vae.pt and sct.pt")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device; the SCT runs in bfloat16 on CUDA, float32 elsewhere (the VAE in float32)")
    args = p.parse_args(argv)
    given = {"--chat": args.chat, "--plan": args.plan, "--audio": args.audio,
             "--prompt": args.prompt is not None and not args.plan}
    if len(modes := [name for name, on in given.items() if on]) != 1 and modes != ["--audio", "--prompt"]:
        p.error(f"choose one mode: --prompt TEXT, --audio IN [--prompt EDIT], --plan FILE or --chat (got "
                f"{' and '.join(modes) or 'none'})")
    for name, lo, hi in (("steps", 1, 1000), ("cfg", 0, 20), ("seed", 0, 2 ** 32 - 1), ("max_new_tokens", 1, 10 ** 6)):
        if not lo <= (value := getattr(args, name)) <= hi:     # NaN fails every comparison
            p.error(f"--{name.replace('_', '-')} {value}: give a number from {lo} to {hi}")
    describe = args.audio and args.prompt is None
    args.out = Path(args.out or ("out/chat" if args.chat else "out/caption.json" if describe else "out/sample.wav"))
    want = () if args.chat else (".json",) if describe else (".wav", ".flac")
    if want and args.out.suffix.lower() not in want:
        p.error(f"--out {args.out}: {'a description is JSON' if describe else 'the audio is written as WAV or FLAC'}; "
                f"end the path with {' or '.join(want)}")
    return args


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.prompt is not None and not args.prompt.strip():
            raise SampleError("--prompt is empty; write an instruction, e.g. --prompt \"rain on a tin roof\"")
        if args.plan and not Path(args.plan).is_file():
            raise SampleError(f"--plan {args.plan}: no such file; write a scene JSON (e.g. one sample.py wrote)")
        plan = accept_plan(Path(args.plan).read_text(errors="replace"), None) if args.plan else None
        clip = read_audio(args.audio, args.trim) if args.audio else None
        try:                                        # --out must be writable: make its folder and a file there
            (folder := args.out if args.chat else args.out.parent).mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
            if args.out.is_dir() and not args.chat:
                raise IsADirectoryError(f"{args.out} is a folder")
        except OSError as e:
            raise SampleError(f"--out {args.out}: cannot write there ({e.strerror or e}); choose another path") from e
        m = load_models(args.ckpt_dir, args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
        opts = Options(args.steps, args.cfg, args.max_new_tokens)
        if args.chat:
            return run_chat(m, args, opts) or 0
        task, user = ("story", {"instruction": args.prompt or plan.scene.description}) if clip is None else \
            ("understand", {"clip": m.encode(clip), "request": DESCRIBE}) if args.prompt is None else \
            ("upload_edit", {"clip": m.encode(clip), "instruction": args.prompt})   # --audio: described or edited
        report(respond(m, [], task, user, None, opts, torch.Generator().manual_seed(args.seed), plan), args.out,
               args.plot)
    except (SampleError, AudioError, CheckpointError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
