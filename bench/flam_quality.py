"""Detection quality of a SmallFLAM checkpoint on a copilot eval split: frame AUROC, frame F1 at 0.5 and the share of
(present caption, absent caption) pairs of a clip ranked right (metrics.detection_quality; bench/README.md).

    python bench/flam_quality.py --ckpt checkpoints/toy/flam.pt --data data/toy              # today's score, p
    python bench/flam_quality.py --ckpt checkpoints/toy/flam.pt --data data/toy --unbiased   # the score before issue 13
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import copilot  # noqa: E402
import metrics  # noqa: E402
from tokenizer import load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description="Frame and clip detection quality of a SmallFLAM on an eval split.")
    p.add_argument("--ckpt", type=Path, required=True, help="flam.pt written by `train.py --stage flam`")
    p.add_argument("--data", type=Path, required=True, help="copilot dataset root; DIR/eval is scored")
    p.add_argument("--unbiased", action="store_true",
                   help="score with FLAM's unbiased map p / (p + sigmoid(beta)), as metrics.py did before issue 13")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(metrics.SmallFLAM, args.ckpt)

    @torch.no_grad()
    def unbiased(audio: torch.Tensor, captions: list[str]) -> torch.Tensor:
        p = model.score(audio, captions)
        return p / (p + model.embed_text(list(captions))[2].sigmoid()[:, None])

    clips = metrics.flam_clips(copilot.read_conversations(args.data, "eval"))
    always = metrics.detection_quality(lambda audio, caps: torch.ones(len(caps), math.ceil(audio.shape[-1] / 4800)),
                                       clips)
    t0 = time.time()
    q = metrics.detection_quality(unbiased if args.unbiased else model.score, clips)
    print(f"{args.ckpt}, {'unbiased map' if args.unbiased else 'p'}, {len(clips)} eval clips of {args.data}: "
          f"frame AUROC "
          f"{q['auroc']:.3f}, F1 at 0.5 {q['f1']:.3f} (always present: {always['f1']:.3f}), right caption above an "
          f"absent one {100 * q['clip']:.1f} % ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
