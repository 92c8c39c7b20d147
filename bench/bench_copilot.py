"""Speed and size of AudioCopilot's offline data: render + mix time per scene, cost of a mix-only edit,
dataset throughput and bytes on disk. Run: python bench/bench_copilot.py [--n 20]"""
import argparse
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import copilot as cp  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=20, help="conversations to time")
    p.add_argument("--threads", type=int, default=1, help="torch threads (dataset workers use 1)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    scenes = []
    for i in range(10 * a.n):  # first scenes of 6 s, the longest
        rng = random.Random(i)
        scene = cp.OfflineCopilot().conversation(rng.choice(cp.TRAIN_SEEDS), rng, 1)[0][2]
        if scene.duration == 6.0:
            scenes.append(scene)
        if len(scenes) == a.n:
            break
    cold = warm = 0.0
    for i, scene in enumerate(scenes):
        renderer = cp.Renderer(seed=i)
        t = time.perf_counter()
        cp.mix_scene(scene, renderer)
        cold += time.perf_counter() - t
        moved = replace(scene, sounds=[replace(s, panning=-s.panning) for s in scene.sounds])  # a mix-only edit
        t = time.perf_counter()
        cp.mix_scene(moved, renderer)
        warm += time.perf_counter() - t
    sounds = sum(len(s.sounds) for s in scenes) / len(scenes)
    print(f"render + mix of a 6 s scene ({sounds:.1f} sounds on average, {a.threads} thread): "
          f"{1000 * cold / len(scenes):.0f} ms  (real-time factor {6 * len(scenes) / cold:.0f}x)")
    print(f"mix-only edit of the same scene (render cache hit): {1000 * warm / len(scenes):.0f} ms  "
          f"({cold / warm:.1f}x faster than rendering)")
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        stats = cp.write_dataset(d, a.n, 0, cp.DatasetConfig(seed=0))
        elapsed = time.perf_counter() - t
        conversations = cp.read_conversations(d)
        turns = [t for c in conversations for t in c.turns]
        size = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
        seconds = sum(t.scene.duration for t in turns)
    print(f"dataset: {a.n / elapsed:.2f} conversations/s, {len(turns) / a.n:.2f} turns each, "
          f"{size / a.n / 1e6:.2f} MB per conversation ({size / seconds / 1e3:.0f} kB per second of stereo audio)")
    limited = sorted(t.limited_db for t in turns if t.limited_db < 0)
    print(f"mix limiter engaged in {len(limited)} of {len(turns)} turns (deepest 5 ms gain reduction: median "
          f"{limited[len(limited) // 2] if limited else 0:.2f} dB, worst {min(limited, default=0):.2f} dB); "
          f"largest per-sound loudness shortfall {max(t.level_error for t in turns):.2f} dB")


if __name__ == "__main__":
    main()
