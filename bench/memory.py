"""GPU memory of one SCT training step under FSDP2, estimated, and the saved-tensor measurement it rests on.

    python bench/memory.py                        # the README's table: the audiochat preset on 8 GPUs
    python bench/memory.py --world 4 --micro-rows 2 --no-checkpointing
    python bench/memory.py --measure              # bytes a block and the LM head save for backward (CPU, bf16)

memory_estimate is arithmetic, not a measurement: bench/gpu_smoke.py prints the peak a real GPU reaches for a
2-layer model of the same shapes, which is how to check it. tests/test_train.py checks the README's table
against it.
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import SCT_PRESETS, Block, SCTConfig, build_attention_mask, count_parameters, rope_cos_sin  # noqa: E402
from train import PRESETS, SCTTrainConfig  # noqa: E402

BLOCK_BYTES_PER_TOKEN_PER_H = 82     # a block saves 82 x hidden_size bytes per token (--measure: 189 kB at 2304)
LOGIT_BYTES = 12                     # per position and vocabulary entry at the peak: bf16 logits and tanh (2 + 2),
                                     # their float32 copy and log-softmax (4 + 4)


def memory_estimate(mc: SCTConfig, tc: SCTTrainConfig, world: int) -> dict[str, float]:
    """GB per GPU of one SCT training step, FSDP2 over `world` GPUs, bf16 autocast, float32 master weights."""
    n, K, H = count_parameters(mc), mc.num_hidden_layers + mc.num_generation_layers, mc.hidden_size
    P, E, tokens = n["total"], n["text embedding (tied LM head)"], tc.seq_len * tc.micro_rows
    ckpt = tc.gradient_checkpointing
    rows = {"weights, gradients, AdamW m and v (fp32), sharded": 16 * P / world,
            "fp32 gradients FSDP2 keeps unsharded across micro-steps (sync off)":
                4 * P * (tc.batch_rows > world * tc.micro_rows),
            "gathered: 2 blocks, the embedding and its gradient (fp32)": 8 * (P - E) / K + 8 * E,
            "each block's input (fp32), kept for recomputation": 4 * H * K * tokens * ckpt,
            "saved tensors of one block (all blocks without checkpointing)":
                BLOCK_BYTES_PER_TOKEN_PER_H * H * tokens * (1 if ckpt else K),
            "LM logits, lm_chunk positions at a time": LOGIT_BYTES * tc.lm_chunk * mc.vocab_size}
    rows = {k: v / 1e9 for k, v in rows.items()}
    return rows | {"total": sum(rows.values())}


def measure(H: int = 2304, I: int = 9216, V: int = 32_000) -> tuple[float, float]:
    """(bytes per token a Gemma 2 block saves for backward, bytes per position and vocabulary entry of the
    soft-capped LM loss), from saved-tensor hooks under bf16 autocast on the CPU. Eager attention's T x T scores
    (flex attention keeps none) are removed by fitting a + b T + c T^2 over three lengths."""
    cfg = replace(SCT_PRESETS["audiochat"], hidden_size=H, intermediate_size=I, num_hidden_layers=1,
                  num_generation_layers=0, vocab_size=V, attn_implementation="eager")
    block, w = Block(cfg, 1), torch.randn(V, H) * 0.02

    def saved(fn) -> int:
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            fn()
        return sum(seen.values())

    sizes = []
    for t in (64, 128, 256):
        x, span = torch.randn(1, t, H, requires_grad=True), torch.zeros(1, t, dtype=torch.long)
        cos, sin = rope_cos_sin(torch.arange(t)[None], cfg.head_dim, cfg.rope_theta, torch.float32)
        sizes.append(saved(lambda: block(x, cos, sin, (build_attention_mask(span), build_attention_mask(span)))))
    c = ((sizes[2] - sizes[1]) / 128 - (sizes[1] - sizes[0]) / 64) / 192        # the T^2 coefficient
    per_token = (sizes[1] - sizes[0]) / 64 - c * 192
    h, w, labels = torch.randn(256, H, requires_grad=True), w.requires_grad_(True), torch.randint(V, (256,))
    lm = [saved(lambda: F.cross_entropy((30 * torch.tanh(F.linear(h[:n], w) / 30)).float(), labels[:n]))
          for n in (128, 256)]
    return per_token, (lm[1] - lm[0]) / 128 / V


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=8, help="GPUs")
    p.add_argument("--micro-rows", type=int, default=None, help="rows per forward pass (default: the preset's)")
    p.add_argument("--no-checkpointing", action="store_true", help="without activation checkpointing")
    p.add_argument("--measure", action="store_true", help="measure the saved tensors on the CPU (a minute)")
    a = p.parse_args()
    if a.measure:
        block, logit = measure()
        print(f"a block saves {block / 1e3:.0f} kB per token for backward ({block / 2304:.0f} x hidden_size bytes); "
              f"the LM loss {logit:.1f} bytes per position and vocabulary entry (+ 6 transient at its peak)")
    tc = PRESETS["audiochat"]["sct"]
    tc = replace(tc, micro_rows=a.micro_rows or tc.micro_rows, gradient_checkpointing=not a.no_checkpointing)
    print(f"| memory per GPU ({a.world} GPUs, {tc.micro_rows} x {tc.seq_len} tokens per forward) | GB |\n|---|---|")
    for k, v in memory_estimate(SCT_PRESETS["audiochat"], tc, a.world).items():
        print(f"| {k} | {v:.1f} |")
