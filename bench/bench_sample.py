"""Time one storytelling request of sample.py, split into plan decoding, diffusion and VAE decoding.

    python bench/bench_sample.py --ckpt-dir checkpoints/toy                 # 150 steps, CFG 3 (appendix D)
    python bench/bench_sample.py --ckpt-dir checkpoints/toy --steps 25 --repeats 5

Each request is the full path of `python sample.py --prompt TEXT` minus writing files: greedy plan decoding
with the KV cache, DPM-Solver++ with CFG over the prefix cache, and VAE decoding. One warm-up request,
then --repeats timed ones (seeds 1..repeats); --plan FILE times a fixed plan instead of decoding one
(for untrained checkpoints, whose text is not a scene). Prints the mean and min seconds per phase, the plan's token
count and decoding rate, the diffusion time per step, and the real-time factor RTF = compute seconds per
second of audio (below 1 is faster than real time).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import sample  # noqa: E402
from tokenizer import SAMPLE_RATE  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", default="checkpoints/toy", help="folder with tokenizer.model, vae.pt and sct.pt")
    p.add_argument("--prompt", default="Create a soundscape with rain on a tin roof and a dog barking on the left.",
                   help="the storytelling instruction")
    p.add_argument("--plan", default=None, help="a scene JSON to render instead of decoding a plan (no plan timing)")
    p.add_argument("--steps", type=int, default=150, help="DPM-Solver++ steps (appendix D: 150)")
    p.add_argument("--cfg", type=float, default=3.0, help="CFG weight (appendix D: 3.0)")
    p.add_argument("--repeats", type=int, default=3, help="timed requests after one warm-up")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="SCT weights (the VAE stays float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    m = sample.load_models(args.ckpt_dir, args.device, getattr(torch, args.dtype))
    opts = sample.Options(steps=args.steps, cfg=args.cfg)
    plan = sample.accept_plan(Path(args.plan).read_text(), None) if args.plan else None
    runs = []
    for seed in range(args.repeats + 1):
        with torch.no_grad():
            t0 = time.perf_counter()
            reply = sample.respond(m, [], "story", {"instruction": args.prompt}, None, opts,
                                   torch.Generator().manual_seed(seed), plan)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            total = time.perf_counter() - t0
        if seed:                                                    # seed 0 warms up
            runs.append({**reply.seconds, "total": total})
    tokens = 0 if plan else len(m.tok.encode(reply.parts["plan"])) + 1     # the plan and the <unused0> ending it
    seconds = reply.audio.shape[1] / SAMPLE_RATE
    print(f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, SCT {args.dtype}, "
          f"{args.ckpt_dir}: {args.steps} steps, CFG {args.cfg}, {args.repeats} requests")
    print(f"plan: {len(reply.plan.scene.sounds)} sounds, {tokens} tokens; audio {seconds:.2f} s = "
          f"{reply.plan.scene.num_frames(40)} frames")
    for phase in ("plan", "diffusion", "vae", "total"):
        values = [r[phase] for r in runs]
        extra = {"plan": f"{tokens / statistics.mean(values):.0f} tokens/s" if tokens else "given (--plan)",
                 "diffusion": f"{1000 * statistics.mean(values) / args.steps:.1f} ms/step (cond + uncond batched)",
                 "vae": "", "total": f"RTF {statistics.mean(values) / seconds:.3f} (compute s per audio s)"}[phase]
        print(f"  {phase:10s} mean {statistics.mean(values):8.3f} s  min {min(values):8.3f} s  {extra}")
    for note in reply.notes:
        print(f"  note: {note}")


if __name__ == "__main__":
    main()
