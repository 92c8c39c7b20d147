"""Speed of model.py against transformers' Gemma 2, the prefix cache, and the exact-vs-SDPA gap.

    python bench/bench_model.py            # about 6 minutes on 2 CPU cores

Prints, from one run (times on a shared machine drift, ratios measured side by side hold):
  1. forward and forward+backward tokens/s of our SCT (Gemma part only) and of transformers' Gemma2ForCausalLM
     (eager: transformers 5.23 has no SDPA path for Gemma 2) on the same small config, as ratios;
  2. training tokens/s of the toy preset (forward + backward + AdamW step);
  3. the time of one denoising step (cond + uncond rows) with a 1000-token prefix cached vs recomputed;
  4. how far the SDPA path (no soft-cap) is from the exact path on a paper-sized attention layer.
"""
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import SCT, SCT_PRESETS, Block, SCTConfig, build_attention_mask, rope_cos_sin  # noqa: E402

import transformers  # noqa: E402  (benchmark-only dependency)


def timed(fn, repeats):
    """Fastest wall time of fn() over `repeats` runs after one warm-up (the minimum is the least disturbed
    by other processes on a shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def compare_with_transformers(B=4, T=512, rounds=6):
    print(f"\n1. Gemma 2 on the same config: hidden 256, 4 layers, 4 heads / 2 KV heads, head_dim 64, MLP 1024, "
          f"vocab 2048, window 128, batch {B} x {T} tokens, float32; text only (forward(ids))")
    ids = torch.randint(0, 2048, (B, T))
    for cap, ours_impl in [(50.0, "eager"), (None, "sdpa")]:
        cfg = replace(SCT_PRESETS["toy"], num_generation_layers=0, attn_logit_softcapping=cap,
                      attn_implementation=ours_impl)
        ours = SCT(cfg)
        hf = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, sliding_window=128,
            attn_logit_softcapping=cap, attn_implementation="eager"))
        hf.load_state_dict({k: v for k, v in ours.state_dict().items() if k.startswith("model.")}, strict=False)
        losses = {"ours": lambda: F.cross_entropy(ours.lm_logits(ours(ids)[0]).flatten(0, 1), ids.flatten()),
                  "transformers": lambda: F.cross_entropy(hf(ids).logits.flatten(0, 1), ids.flatten())}
        with torch.no_grad():
            diff = (losses["ours"]() - losses["transformers"]()).abs().item()
        best = {(name, mode): float("inf") for name in losses for mode in ("fwd", "fwd+bwd")}
        for _ in range(rounds):                              # interleaved, so load on the machine hits both alike
            for name, loss in losses.items():
                with torch.no_grad():
                    best[name, "fwd"] = min(best[name, "fwd"], timed(loss, 1))
                best[name, "fwd+bwd"] = min(best[name, "fwd+bwd"], timed(lambda: loss().backward(), 1))
        print(f"   ours {ours_impl} vs transformers eager, attention soft-cap {cap}: |loss difference| {diff:.1e}")
        for mode in ("fwd", "fwd+bwd"):
            o, h = best["ours", mode], best["transformers", mode]
            print(f"     {mode:8s} ours {B * T / o:7.0f} tok/s, transformers {B * T / h:7.0f} tok/s, "
                  f"ours/transformers {h / o:.2f}x")


def toy_training_speed(B=4, T=600, repeats=4):
    cfg = SCT_PRESETS["toy"]
    model = SCT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    span = torch.zeros(B, T, dtype=torch.long)
    span[:, 200:520] = 1                                     # one 8 s span (320 frames) per row
    audio, t = torch.randn(B, T, cfg.audio_dim), torch.rand(B, 1).expand(B, T)

    def step():
        h_text, h_audio = model(ids, audio, span > 0, t, span)
        loss = F.cross_entropy(model.lm_logits(h_text).flatten(0, 1), ids.flatten()) + \
            model.velocity(h_audio).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = timed(step, repeats)
    print(f"\n2. Toy preset ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{cfg.attn_implementation}) training step, "
          f"batch {B} x {T}: {B * T / sec:.0f} tokens/s ({sec * 1000:.0f} ms/step)")


def prefix_cache_speed(P=1000, F_=320, repeats=5):
    cfg = SCT_PRESETS["toy"]
    model = SCT(cfg).eval()
    g = torch.Generator().manual_seed(0)
    cond_span = torch.zeros(P, dtype=torch.long)
    cond_span[100:420] = 1                                   # the prompt holds an earlier 8 s span
    rows = [(torch.randint(3, cfg.vocab_size, (P,), generator=g), torch.randn(320, cfg.audio_dim), cond_span),
            (torch.randint(3, cfg.vocab_size, (6,), generator=g), torch.zeros(0, cfg.audio_dim),
             torch.zeros(6, dtype=torch.long))]
    x, t = torch.randn(2, F_, cfg.audio_dim), torch.full((2,), 0.5)
    cache = model.prefix_cache(*map(list, zip(*rows)), num_frames=F_)
    cached = timed(lambda: model.denoise_step(cache, x, t), repeats)
    build = timed(lambda: model.prefix_cache(*map(list, zip(*rows)), num_frames=F_), 2)

    def recompute():                                         # both rows in full, left-padded, every step
        ids, audio, _, span, doc = model._left_pad(*map(list, zip(*rows)))
        new = torch.full((2, F_), int(span.max()) + 1)
        span2, doc2 = torch.cat([span, new], 1), torch.cat([doc, torch.zeros(2, F_, dtype=torch.long)], 1)
        audio2 = torch.cat([audio, x], 1)
        times = torch.cat([torch.zeros(2, ids.shape[1]), t[:, None].expand(2, F_)], 1)
        with torch.no_grad():
            h_audio = model(torch.cat([ids, torch.zeros(2, F_, dtype=torch.long)], 1), audio2, span2 > 0, times, span2,
                            doc2)[1]
        return model.velocity(h_audio[:, -F_:])

    full = timed(recompute, repeats)
    print(f"\n3. Denoising step, toy preset, cond + uncond rows, {P}-token prefix, {F_} frames: "
          f"cached {cached * 1000:.0f} ms, recomputed {full * 1000:.0f} ms ({full / cached:.1f}x); "
          f"building the cache once {build * 1000:.0f} ms")


def exact_vs_sdpa_gap(T=512):
    """One paper-sized attention layer (hidden 2304, 8 heads / 4 KV heads, head_dim 256, window 4096) on a
    causal sequence; q/k weight scale swept so that the largest pre-cap logit spans realistic ranges."""
    print(f"\n4. Exact (soft-cap 50) vs SDPA (no cap) on a paper-sized attention layer, {T} tokens:")
    g = torch.Generator().manual_seed(0)
    cfg = SCTConfig(num_generation_layers=0)
    block = Block(cfg, layer_idx=1)                          # a global layer
    x = torch.randn(1, T, cfg.hidden_size, generator=g)
    span = torch.zeros(1, T, dtype=torch.long)
    masks = (build_attention_mask(span), build_attention_mask(span, None, cfg.sliding_window))
    cos, sin = rope_cos_sin(torch.arange(T)[None], cfg.head_dim, cfg.rope_theta, torch.float32)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.02))   # std 0.02, (1 + w) near 1
        h = block.input_layernorm(x)
        for qk_std in (0.02, 0.04, 0.06, 0.08):
            attn = block.self_attn
            attn.q_proj.weight.copy_(torch.randn(attn.q_proj.weight.shape, generator=g) * qk_std)
            attn.k_proj.weight.copy_(torch.randn(attn.k_proj.weight.shape, generator=g) * qk_std)
            q = attn.q_proj(h).view(1, T, -1, 256).transpose(1, 2)
            k = attn.k_proj(h).view(1, T, -1, 256).transpose(1, 2).repeat_interleave(2, 1)
            scores = (q @ k.transpose(-1, -2) * 256 ** -0.5).masked_fill(~masks[0], 0)
            attn.config = replace(cfg, attn_implementation="eager")
            exact = attn(h, cos, sin, masks)
            attn.config = replace(cfg, attn_logit_softcapping=None, attn_implementation="sdpa")
            fast = attn(h, cos, sin, masks)
            rel = ((exact - fast).norm() / exact.norm()).item()
            print(f"   q/k weight std {qk_std:.2f}: max |logit| {scores.abs().max():6.1f}, "
                  f"{(scores.abs() > 25).float().mean() * 100:5.2f} % above 25; "
                  f"max |exact - sdpa| {(exact - fast).abs().max():.2e}, relative L2 {rel:.2e}")


if __name__ == "__main__":
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    compare_with_transformers()
    toy_training_speed()
    prefix_cache_speed()
    exact_vs_sdpa_gap()
