"""Answer every conversation of a copilot eval split with sample.py's functions, in the layout metrics.py reads.

    python bench/eval_split.py --data data/toy --out out/toy --steps 25
    python metrics.py --data data/toy --system out/toy

Turn k of each conversation is asked given the REFERENCE turns before it (their instructions, plans and audio, as
stories: Eq. 3) -> OUT/<id>/turn{k}.wav and .json; turn 0's reference audio is described -> OUT/<id>/caption.json.
A turn whose model wrote no usable plan gets 1 s of silence and a null plan, with the reason in its notes. Finished
outputs are kept, so a rerun resumes. Seeds: --seed + crc32("<id>|<k>").
"""
import argparse
import json
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import sample  # noqa: E402
from copilot import read_conversations, scene_to_json  # noqa: E402
from tokenizer import (DESCRIBE, SAMPLE_RATE, AudioError, CheckpointError, Turn, save_audio, task_turns,  # noqa: E402
                       write_atomic)


def reference_history(conv, k: int, clips: list[torch.Tensor]) -> list[Turn]:
    """The reference turns before turn k of a copilot conversation, as stories (Eq. 3)."""
    return [t for j in range(k) for t in task_turns("story", instruction=conv.turns[j].instruction,
                                                     plan=scene_to_json(conv.turns[j].scene), audio=clips[j])]


def eval_one(m: sample.Models, history: list[Turn], task: str, user: dict, previous, opts: sample.Options, seed: int,
             stem: Path) -> None:
    """One output unless done: stem.wav (1 s of silence when the model made no usable plan) and stem.json."""
    if stem.with_suffix(".json").is_file():
        return
    t0 = time.perf_counter()
    try:
        reply = sample.respond_in_context(m, history, task, user, previous, opts, seed)[0]
        checked, notes = reply.caption if task == "understand" else reply.plan, reply.notes
    except sample.SampleError as e:                  # recorded; the eval goes on
        reply, checked, notes = None, None, [str(e)]
    if task != "understand":
        save_audio(stem.with_suffix(".wav"), reply.audio if reply else torch.zeros(2, SAMPLE_RATE))
    scene = json.loads(scene_to_json(checked.scene)) if checked is not None and checked.valid else None
    record = {"seconds": time.perf_counter() - t0, "scene" if task == "understand" else "plan": scene, "notes": notes}
    text = json.dumps(record, ensure_ascii=False, indent=1) + "\n"
    write_atomic(stem.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))


def run_eval(m: sample.Models, data: Path, out: Path, opts: sample.Options, seed: int = 0) -> None:
    """Every conversation of data/eval in metrics.py's layout under out (module docstring), resumable."""
    for conv in tqdm(read_conversations(data, "eval"), desc="eval", unit="conversation"):
        clips = [m.encode(sample.read_audio(t.audio)) for t in conv.turns]
        for k, turn in enumerate(conv.turns):
            eval_one(m, reference_history(conv, k, clips), "story", {"instruction": turn.instruction},
                     conv.turns[k - 1].scene if k else None, opts, seed + zlib.crc32(f"{conv.id}|{k}".encode()),
                     out / conv.id / f"turn{k}")
        eval_one(m, [], "understand", {"clip": clips[0], "request": DESCRIBE}, None, opts, 0, out / conv.id / "caption")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="copilot dataset folder whose eval/ split is answered")
    p.add_argument("--out", type=Path, required=True, help="output folder (metrics.py --system)")
    p.add_argument("--ckpt-dir", default="checkpoints/toy", help="folder with tokenizer.model, vae.pt and sct.pt")
    p.add_argument("--seed", type=int, default=0, help="base seed of the diffusion noise")
    p.add_argument("--steps", type=int, default=150, help="DPM-Solver++(2M) steps (appendix D: 150)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance weight (appendix D: 3.0)")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="most text tokens the model may write per turn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = p.parse_args(argv)
    try:
        m = sample.load_models(args.ckpt_dir, args.device,
                               torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
        with torch.no_grad():
            run_eval(m, args.data, args.out, sample.Options(args.steps, args.cfg, args.max_new_tokens), args.seed)
    except (sample.SampleError, AudioError, CheckpointError, FileNotFoundError) as e:
        print(f"eval_split.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
