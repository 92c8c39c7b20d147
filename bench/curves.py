"""The conditioning diagnostics over training: train.py's held-out evals of every SCT stage (kept in sct1.pt, sct2.pt
and sct.pt), printed as a table and drawn as curves over the steps of the three stages in a row.

    python bench/curves.py --ckpt-dir checkpoints/mine --png bench/curves.png
    python bench/curves.py --ckpt-dir checkpoints/toy --measure checkpoints/mine/latents --data data/toy   # sct.pt now

lm_gap: the LM loss of held-out plans given another conversation's instruction minus given their own (nats per
token); diff_gap@t: the v-loss of held-out story audio given another conversation's plan minus given its own, at
diffusion time t, same noise; place_gap@t: the same given its own plan mirrored (the same sounds, each on the other
side and at the other end of the scene). 0 means the model ignores that condition (train.conditioning_gaps).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenizer import load_checkpoint  # noqa: E402

KEYS = ("lm", "diff", "lm_plan", "lm_gap", "diff_gap@0.3", "diff_gap@0.6", "diff_gap@0.9", "place_gap@0.9")


def read_evals(ckpt_dir: Path) -> list[dict]:
    """Every eval of the SCT stages in order, with "stage" and "at" (steps since the start of stage 1)."""
    rows, offset = [], 0
    for stage, name in (("sct1", "sct1.pt"), ("sct2", "sct2.pt"), ("sct3", "sct.pt")):
        if not (path := ckpt_dir / name).is_file():
            continue
        ckpt = load_checkpoint(path, "sct")
        rows += [e | {"stage": stage, "at": offset + e["step"]} for e in ckpt.get("evals", [])]
        offset += ckpt["step"]
    return rows


def measure(ckpt_dir: Path, latents: Path, data: Path) -> dict:
    """train.conditioning_gaps of ckpt_dir/sct.pt on 16 eval stories, as the toy's evals do, and at t = 0.99 too."""
    import torch
    import train
    from model import SCT
    from tokenizer import TextTokenizer, load_model
    tok, sct = TextTokenizer(ckpt_dir / "tokenizer.model"), load_model(SCT, ckpt_dir / "sct.pt").float()
    stories = train.TaskData(train.DataConfig(), data, latents, "eval", tok, sct.config.audio_dim)
    gaps = train.conditioning_gaps(sct, stories, 16, 0, torch.device("cpu"), times=(0.3, 0.6, 0.9, 0.99))
    print(" | ".join(f"{k} {v:.4f}" for k, v in gaps.items()))
    return gaps


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt-dir", type=Path, default=Path("checkpoints/toy"), help="sct1.pt, sct2.pt, sct.pt")
    p.add_argument("--png", type=Path, help="also draw the curves here (needs matplotlib)")
    p.add_argument("--measure", type=Path, metavar="LATENTS", help="instead, the gaps of sct.pt now on the eval split "
                   "of --data, whose latents (a run's latents/ folder) are here; t = 0.3, 0.6, 0.9, 0.99")
    p.add_argument("--data", type=Path, default=Path("data/toy"), help="the copilot dataset of --measure")
    a = p.parse_args(argv)
    if a.measure:
        return [measure(a.ckpt_dir, a.measure, a.data)]
    rows = read_evals(a.ckpt_dir)
    if not rows:
        raise SystemExit(f"{a.ckpt_dir}: no SCT checkpoint with evals (sct1.pt, sct2.pt, sct.pt)")
    print("| stage | step | " + " | ".join(KEYS) + " |\n|---|---|" + "---|" * len(KEYS))
    for r in rows:
        print(f"| {r['stage']} | {r['at']} | " + " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in KEYS) + " |")
    if a.png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise SystemExit("--png needs matplotlib: `pip install matplotlib`")
        fig, (lm, diff) = plt.subplots(1, 2, figsize=(10, 3.5))
        at = [r["at"] for r in rows]
        lm.plot(at, [r.get("lm_gap", float("nan")) for r in rows], "o-", label="LM gap (plan | instruction)")
        lm.plot(at, [r.get("lm_plan", float("nan")) for r in rows], "s--", label="LM loss of the plan, own instruction")
        for t in ("0.3", "0.6", "0.9"):
            diff.plot(at, [r.get(f"diff_gap@{t}", float("nan")) for r in rows], "o-", label=f"diffusion gap, t = {t}")
        diff.plot(at, [r.get("place_gap@0.9", float("nan")) for r in rows], "s--", label="place gap, t = 0.9")
        for ax, title in ((lm, "what the plan takes from the prompt"), (diff, "what the audio takes from the plan")):
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel("SCT step (stages 1-3 in a row)")
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.png, dpi=100)
        print(f"wrote {a.png}")
    return rows


if __name__ == "__main__":
    main()
