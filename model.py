"""The Self-Cascaded Transformer (SCT): Gemma 2 with a diffusion tower on top.

Owns: the Gemma 2 decoder, computed exactly as Hugging Face's Gemma2ForCausalLM does; the SCT of paper
section 4.1 and appendix B.2 (K decoder layers: the first U feed the LM head, all K feed the diffusion
head; an audio in-projection and a diffusion-timestep embedding); the attention mask of section 4.2 and
Fig. 4; KV caches for inference; loading Gemma 2 safetensors checkpoints (appendix B.2: the first 26
layers and the tied embeddings come from Gemma 2 2B).

Attention (config.attn_implementation). SDPA cannot soft-cap logits, so there are three paths:
  "eager"  explicit matmul + soft-cap + mask + float32 softmax: the exact reference, any device.
  "sdpa"   torch SDPA with a boolean mask; exact only without a soft-cap, so the config demands
           attn_logit_softcapping=None. About 2x faster than eager on CPU: the toy preset uses it.
  "flex"   torch flex_attention with a soft-cap score_mod and block masks: exact, and the fast path
           on GPU (the audiochat preset). Its backward is not implemented on CPU (torch 2.13).
  Cached inference (generate, denoise_step) builds dense masks, so "flex" runs eager there.

Inference API (sample.py). Prompts are lists of 1-D rows (ids [T_i], clean latents [N_i, audio_dim] of the
row's audio frames in order, span ids [T_i]) as in tokenizer.Example, left-padded inside (the padding is a
document of its own). SCT.generate(ids, latents, span_ids, max_new_tokens, stop_ids) decodes text greedily
over the U layers (one prefill into a KVCache, then a token per step); cache = SCT.prefix_cache(ids, latents,
span_ids, num_frames) runs all K layers over each prefix once; v = SCT.denoise_step(cache, x [B, F, audio_dim],
t [B]) runs only the F noisy frames against it (CFG batches the cond and uncond prefixes of different lengths).

Training (paper 4.1: "the first U layers are trained only by a LM head ... The remaining K - U layers are also
optimized by the diffusion objective"). Reading A (SCT.understanding_grad True) lets the diffusion loss train
all K layers; reading B (False) stops it at layer U. The diffusion time and the noisy latents enter only through
the input embedding (audio_in + time_embed), so a plain cut would leave those untrained by the diffusion loss;
B passes layer U's state on detached plus a straight-through copy of the audio positions' input embedding: the
forward is unchanged (checkpoints and inference are the same under both), and the diffusion gradient reaches
audio_in and time_embed as through the residual stream's identity path, never the U layers or text embeddings.

Count parameters: `python model.py --params audiochat`.  Tests: `python -m pytest -q tests/test_model.py`.
"""
import argparse
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint


# -----------------------------------------------------------------------------
# Configuration

@dataclass
class SCTConfig:
    """Field names follow Hugging Face's Gemma2Config, so a Gemma 2 config.json maps one to one."""
    vocab_size: int = field(default=256_000, metadata={"help": "text vocabulary (the toy's: set by train.py)"})
    hidden_size: int = field(default=2304, metadata={"help": "residual width H"})
    intermediate_size: int = field(default=9216, metadata={"help": "GeGLU width of every MLP"})
    num_hidden_layers: int = field(default=26, metadata={"help": "U: understanding layers (Gemma's), LM head"})
    num_generation_layers: int = field(default=13, metadata={"help": "K - U: generation layers, diffusion head only"})
    num_attention_heads: int = field(default=8, metadata={"help": "query heads"})
    num_key_value_heads: int = field(default=4, metadata={"help": "key/value heads (grouped-query attention)"})
    head_dim: int = field(default=256, metadata={"help": "per head; need not be hidden_size / heads"})
    query_pre_attn_scalar: float = field(default=256, metadata={"help": "scores are scaled by its ** -0.5"})
    sliding_window: int | None = field(default=4096, metadata={"help": "even layers only see keys closer than this"})
    attn_logit_softcapping: float | None = field(default=50.0, metadata={
        "help": "attention scores -> cap * tanh(scores / cap); none = off"})
    final_logit_softcapping: float | None = field(default=30.0, metadata={
        "help": "LM logits -> cap * tanh(logits / cap); none = off"})
    rope_theta: float = field(default=10_000.0, metadata={"help": "RoPE base, rotate-half layout over the whole head"})
    rms_norm_eps: float = field(default=1e-6, metadata={"help": "added to the mean square in every RMSNorm"})
    max_position_embeddings: int = field(default=8192, metadata={
        "help": "longest document Gemma 2 was trained on (positions restart per packed document)"})
    hidden_activation: str = field(default="gelu_pytorch_tanh", metadata={"help": "GeGLU gate; Gemma 2's only one"})
    audio_dim: int = field(default=256, metadata={"help": "latent size per frame (2 x 128, B.1; train.py sets)"})
    attn_implementation: str = field(default="eager", metadata={
        "help": "eager (exact) | sdpa (needs no soft-cap) | flex (exact, GPU); see the module docstring"})

    def __post_init__(self):
        if self.attn_implementation not in ("eager", "sdpa", "flex"):
            raise ValueError(f"attn_implementation={self.attn_implementation!r}; use 'eager', 'sdpa' or 'flex'")
        if self.attn_implementation == "sdpa" and self.attn_logit_softcapping is not None:
            raise ValueError(f"attn_implementation='sdpa' cannot soft-cap attention logits (attn_logit_softcapping="
                             f"{self.attn_logit_softcapping}): use 'eager' (exact), 'flex' (exact, GPU), or set the "
                             f"cap to None")
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(f"hidden_activation={self.hidden_activation!r}; Gemma 2 uses 'gelu_pytorch_tanh'")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} query heads are not a multiple of "
                             f"{self.num_key_value_heads} KV heads")
        if self.num_hidden_layers < 1 or self.num_generation_layers < 0:
            raise ValueError(f"need U >= 1 understanding and >= 0 generation layers, got "
                             f"{self.num_hidden_layers} and {self.num_generation_layers}")


SCT_PRESETS = {
    # Trained from scratch on CPU: no attention soft-cap (it tames pretrained Gemma logits; a fresh toy does
    # not need it), which makes the 2x faster SDPA path exact. train.py sets vocab_size and audio_dim.
    "toy": SCTConfig(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                     num_generation_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     query_pre_attn_scalar=64, sliding_window=128, attn_logit_softcapping=None,
                     audio_dim=64, attn_implementation="sdpa"),           # audio_dim: the toy VAE's 2 x 32
    # Paper B.2: Gemma 2 2B (26 layers) + 13 generation layers, 3.6 B parameters.
    "audiochat": SCTConfig(attn_implementation="flex"),
}


# -----------------------------------------------------------------------------
# Gemma 2 building blocks

def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): smooth clipping to (-cap, cap), in Hugging Face's order of operations."""
    return torch.tanh(x / cap) * cap


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + w), in float32 and cast back after the multiply (HF PR 29402)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # zero is a scale of one, because of the (1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin (B, 1, T, head_dim) for integer positions (B, T); computed in float32 like HF."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions[..., None].float() * inv_freq               # (B, T, head_dim / 2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hd) by the position angles, rotate-half convention (first half pairs with second)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids (contiguous runs) -> (B, T) RoPE positions restarting at 0 in each document."""
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - torch.where(start, idx, 0).cummax(dim=1).values


def build_attention_mask(span_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                         sliding_window: int | None = None, num_queries: int | None = None) -> torch.Tensor:
    """(B, 1, Tq, T) bool, True = may attend; paper section 4.2 and Fig. 4.

    span_ids, doc_ids (B, T) describe every key (span 0 = text, k > 0 = the k-th audio span of its document);
    the queries are the last Tq = num_queries tokens (all T by default; fewer when keys come from a cache).
    A query sees a key of its own document that is not later than it (text is causal, spans see everything
    before them), or any key of its own audio span (bidirectional inside a span, so no earlier token sees
    a later span). Sliding-window layers also require |query - key| < sliding_window: for causal text this
    is HF's rule (the query and the window - 1 tokens before it); inside a span the window is symmetric.
    """
    B, T = span_ids.shape
    Tq = T if num_queries is None else num_queries
    doc = torch.zeros_like(span_ids) if doc_ids is None else doc_ids
    k_idx = torch.arange(T, device=span_ids.device)
    q_idx = k_idx[T - Tq:]
    q_span, q_doc = span_ids[:, T - Tq:, None], doc[:, T - Tq:, None]           # (B, Tq, 1)
    same_span = (q_span == span_ids[:, None, :]) & (q_span > 0)                 # (B, Tq, T)
    allowed = (q_doc == doc[:, None, :]) & ((k_idx <= q_idx[:, None]) | same_span)
    if sliding_window is not None:
        allowed = allowed & ((q_idx[:, None] - k_idx).abs() < sliding_window)
    return allowed[:, None]


def build_block_masks(span_ids: torch.Tensor, doc_ids: torch.Tensor, sliding_window: int | None):
    """The same rule as build_attention_mask as flex_attention BlockMasks: (global, sliding)."""
    def mask_mod(b, h, q, k):
        same_span = (span_ids[b, q] == span_ids[b, k]) & (span_ids[b, q] > 0)
        return (doc_ids[b, q] == doc_ids[b, k]) & ((k <= q) | same_span)

    def sliding_mod(b, h, q, k):
        return mask_mod(b, h, q, k) & ((q - k).abs() < sliding_window)

    B, T = span_ids.shape
    full = create_block_mask(mask_mod, B, None, T, T, device=span_ids.device)
    sliding = full if sliding_window is None else create_block_mask(sliding_mod, B, None, T, T, device=span_ids.device)
    return full, sliding


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention)  # uncompiled flex materialises every score; compiled it is a fused kernel


@functools.cache
def _softcap_score_mod(cap: float):
    return lambda score, b, h, q_idx, k_idx: softcap(score, cap)  # one function per cap: no recompiles


def attend(q, k, v, mask, scale: float, cap: float | None, impl: str) -> torch.Tensor:
    """Grouped-query attention: q (B, nh, T, hd), k and v (B, nkv, S, hd), mask (B, 1, T, S) bool or a
    BlockMask -> (B, nh, T, hd). Query head h uses key/value head h // (nh / nkv), as HF's repeat_kv."""
    if isinstance(mask, BlockMask):
        score_mod = None if cap is None else _softcap_score_mod(cap)
        flex = _compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=True)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return attention_weights(q, k, mask, scale, cap).to(q.dtype) @ v.repeat_interleave(q.shape[1] // v.shape[1], 1)


def attention_weights(q, k, mask, scale: float, cap: float | None) -> torch.Tensor:
    """The exact path's float32 softmax weights (B, nh, T, S) for a bool mask (also read by bench/probe.py)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)             # (B, nh, S, hd)
    scores = (q @ k.transpose(-2, -1)) * scale                             # (B, nh, T, S)
    if cap is not None:
        scores = softcap(scores, cap)                                      # before the mask, as Gemma 2
    scores.masked_fill_(~mask, float("-inf"))                              # in place: scores is a fresh tensor
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


class KVCache:
    """Keys and values of every token seen so far, per layer, preallocated (nanochat style).

    `length` tokens are committed. update() writes the new tokens right after them and returns all keys;
    the caller commits by advancing `length` (text decoding) or does not (a denoising step rewrites the
    same F slots at every step). span_ids / doc_ids / pad describe the cached tokens for the mask and RoPE.
    """

    def __init__(self, config: SCTConfig, num_layers: int, batch: int, capacity: int, dtype, device):
        shape = (num_layers, batch, config.num_key_value_heads, capacity, config.head_dim)
        self.k, self.v = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
        self.span_ids, self.doc_ids = (torch.zeros(batch, capacity, dtype=torch.long, device=device) for _ in range(2))
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)  # left padding per row
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, nkv, T, hd) of the new tokens -> all keys and values (B, nkv, length + T, hd)."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache full: {end} tokens > capacity {self.k.shape[3]}; allocate a larger cache")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: SCTConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.sliding = layer_idx % 2 == 0  # HF layer_types: "sliding_attention" when (i + 1) % 2
        H, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(H, config.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(H, config.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(H, config.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, H, bias=False)

    def forward(self, x, cos, sin, masks, cache: KVCache | None = None) -> torch.Tensor:
        (B, T, _), cfg = x.shape, self.config
        q = self.q_proj(x).view(B, T, -1, cfg.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, -1, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                     # (B, nkv, S, hd)
        y = attend(q, k, v, masks[self.sliding], cfg.query_pre_attn_scalar ** -0.5,
                   cfg.attn_logit_softcapping, cfg.attn_implementation)   # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: SCTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    """One Gemma 2 decoder layer: attention and MLP, each between a pre-norm and a post-norm."""

    def __init__(self, config: SCTConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        H, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(H, eps), RMSNorm(H, eps)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = RMSNorm(H, eps), RMSNorm(H, eps)

    def forward(self, x, cos, sin, masks, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, masks, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class TimestepEmbedder(nn.Module):
    """Diffusion time t in [0, 1] (..., ) -> (..., H): sinusoidal features of 1000 t, then a SiLU MLP (DiT)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
        args = 1000 * t.float()[..., None] * freqs  # DiT's integer timesteps run over 0..1000
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


# -----------------------------------------------------------------------------
# The Self-Cascaded Transformer

class SCT(nn.Module):
    """Gemma 2 (model.*, HF state-dict names) with K - U generation layers after its U layers (paper B.2)."""
    kind, config_class = "sct", SCTConfig     # what tokenizer.load_model reads from an sct.pt

    def __init__(self, config: SCTConfig):
        super().__init__()
        self.config = config
        H, K = config.hidden_size, config.num_hidden_layers + config.num_generation_layers
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, H),                  # tied with the LM head
            layers=nn.ModuleList(Block(config, i) for i in range(K)),         # U understanding, then generation
            norm=RMSNorm(H, config.rms_norm_eps),                             # final norm before the LM head
        ))
        self.audio_in = nn.Linear(config.audio_dim, H, bias=False)            # latent frame -> residual stream
        self.time_embed = TimestepEmbedder(H)
        self.audio_norm = RMSNorm(H, config.rms_norm_eps)                    # final norm before the diffusion head
        self.diffusion_head = nn.Linear(H, config.audio_dim)                  # predicts v (Salimans & Ho, 2022)
        self.gradient_checkpointing = False  # train.py: recompute each block in the backward pass to save memory
        self.understanding_grad = True       # train.py: False = reading B (module docstring)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Initialise every weight; from_gemma then overwrites the Gemma part (embeddings, layers < U, norm).

        | weight                                          | init                                         |
        |-------------------------------------------------|----------------------------------------------|
        | embed_tokens, every q/k/v/o and gate/up/down    | normal, std 0.02 (Gemma's initializer_range) |
        | every RMSNorm weight                            | 0, a scale of 1 through the (1 + w)          |
        | audio_in                                        | normal, std 0.02 (only its direction counts: |
        |                                                 | embed() rescales its output, paper C.2)      |
        | time_embed MLP weights / biases                 | normal, std 0.02 / 0 (DiT)                   |
        | diffusion_head weight and bias                  | 0: the first velocity is 0, as DiT's final   |
        |                                                 | layer; gradients still reach the weight      |
        """
        for name, p in self.named_parameters():
            if "norm" in name or name.startswith("diffusion_head") or name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)

    # ---- inputs -------------------------------------------------------------

    def embed(self, ids, audio=None, audio_mask=None, t=None) -> torch.Tensor:
        """(B, T) ids, (B, T, audio_dim) latents, (B, T) mask and time -> (B, T, H) input vectors."""
        E, H = self.model.embed_tokens.weight, self.config.hidden_size
        # Gemma multiplies by sqrt(H) as a tensor in the activation dtype (sqrt(3072) becomes 55.5 in bf16).
        x = self.model.embed_tokens(ids) * torch.tensor(H ** 0.5, dtype=E.dtype)
        if audio is None:
            return x
        # Paper C.2: audio embedding norms are scaled to the text embedding norm. Our rule: for latents of
        # unit variance per dimension (the VAE normalises them) the expected RMS of an audio embedding equals
        # the RMS of the scaled text embedding table, E||Wx||^2 = ||W||_F^2. The factor depends on the weights
        # only, never on the batch, so loud and quiet frames keep their relative norms.
        W = self.audio_in.weight
        text_rms = torch.linalg.vector_norm(E.detach()) / E.shape[0] ** 0.5        # = rms(E) * sqrt(H)
        audio_rms = torch.linalg.vector_norm(W) / H ** 0.5
        a = self.audio_in(audio.to(W.dtype).masked_fill(~audio_mask[..., None], 0)) * (text_rms / audio_rms).to(W.dtype)
        a = a + self.time_embed(t)                                        # the time is added to audio tokens only
        return torch.where(audio_mask[..., None], a, x)

    def _check(self, ids, audio, audio_mask, t, span_ids, doc_ids):
        B, T = ids.shape
        if audio is not None and (audio_mask is None or t is None):
            raise ValueError("SCT.forward: audio needs audio_mask and t (leave all three None for text-only batches)")
        given = [("span_ids", span_ids, (B, T)), ("doc_ids", doc_ids, (B, T))]
        if audio is not None:
            given += [("audio", audio, (B, T, self.config.audio_dim)), ("audio_mask", audio_mask, (B, T)),
                      ("t", t, (B, T))]
        for name, x, shape in given:
            if x is not None and tuple(x.shape) != shape:
                raise ValueError(f"SCT.forward: {name} has shape {tuple(x.shape)}, expected {shape} "
                                 f"(ids are {tuple(ids.shape)}, audio_dim {self.config.audio_dim})")
        if audio is None and bool((span_ids > 0).any()):
            raise ValueError("SCT.forward: span_ids mark audio frames but no audio was given")
        if audio is not None and not torch.equal(audio_mask, span_ids > 0):
            raise ValueError("SCT.forward: audio_mask must be True exactly where span_ids > 0 (audio frames)")

    # ---- training forward ---------------------------------------------------

    def forward(self, ids, audio=None, audio_mask=None, t=None, span_ids=None, doc_ids=None):
        """Training/scoring pass over whole sequences -> (h_text, h_audio), both (B, T, H).

        ids (B, T) long; audio (B, T, audio_dim) noisy latents at audio positions; audio_mask (B, T) bool;
        t (B, T) diffusion time (0 = clean); span_ids (B, T) (0 text, > 0 audio span, unique per document);
        doc_ids (B, T) packed documents as contiguous runs (None = one document per row).
        A text-only batch (TextLM data) may leave audio, audio_mask, t and span_ids as None.
        h_text is layer U after the final norm (for lm_logits), h_audio layer K after its own norm (velocity).
        """
        span_ids = torch.zeros_like(ids) if span_ids is None else span_ids
        self._check(ids, audio, audio_mask, t, span_ids, doc_ids)
        cfg, doc = self.config, torch.zeros_like(ids) if doc_ids is None else doc_ids
        x = e = self.embed(ids, audio, audio_mask, t)                                  # (B, T, H)
        cos, sin = rope_cos_sin(document_positions(doc), cfg.head_dim, cfg.rope_theta, x.dtype)
        if cfg.attn_implementation == "flex":
            if not x.is_cuda and torch.is_grad_enabled():
                raise ValueError("flex attention has no CPU backward (torch 2.13): use attn_implementation='eager'")
            masks = build_block_masks(span_ids, doc, cfg.sliding_window)
        else:
            masks = (build_attention_mask(span_ids, doc), build_attention_mask(span_ids, doc, cfg.sliding_window))
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, masks, use_reentrant=False)
            else:
                x = block(x, cos, sin, masks)
            if i == cfg.num_hidden_layers - 1:
                h_text = self.model.norm(x)
                if not self.understanding_grad:                                         # reading B
                    x = x.detach() + (0 if audio is None else torch.where(audio_mask[..., None], e - e.detach(), 0))
        return h_text, self.audio_norm(x)

    def lm_logits(self, h_text: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., vocab): tied embeddings, then the final soft-cap (before any loss)."""
        logits, cap = F.linear(h_text, self.model.embed_tokens.weight), self.config.final_logit_softcapping
        return logits if cap is None else softcap(logits, cap)

    def velocity(self, h_audio: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., audio_dim): the diffusion head's v-prediction."""
        return self.diffusion_head(h_audio)

    # ---- cached inference ---------------------------------------------------

    def _left_pad(self, ids, latents, span_ids):
        """Rows of 1-D tensors -> left-padded ids, latents (B, T, audio_dim), audio mask, span ids, doc ids."""
        latents = latents or [torch.zeros(0, self.config.audio_dim)] * len(ids)   # None: text-only rows
        if not (len(ids) == len(latents) == len(span_ids)) or not ids:
            raise ValueError(f"need as many ids, latents and span_ids rows (>= 1), got {len(ids)}, {len(latents)}, "
                             f"{len(span_ids)}")
        dev, A = self.model.embed_tokens.weight.device, self.config.audio_dim
        B, T = len(ids), max(len(r) for r in ids)
        out = dict(ids=torch.zeros(B, T, dtype=torch.long), span=torch.zeros(B, T, dtype=torch.long),
                   doc=torch.full((B, T), -1), audio=torch.zeros(B, T, A))
        for b, (i, z, s) in enumerate(zip(ids, latents, span_ids)):
            n, frames = len(i), s > 0
            if len(s) != n or tuple(z.shape) != (int(frames.sum()), A):
                raise ValueError(f"row {b}: {n} ids, {len(s)} span ids, {int(frames.sum())} audio frames, "
                                 f"latents {tuple(z.shape)}; expected span ids like ids and latents (frames, {A})")
            out["ids"][b, T - n:], out["span"][b, T - n:], out["doc"][b, T - n:] = i, s, 0
            out["audio"][b, T - n:][frames] = z.float().cpu()
        out = {k: v.to(dev) for k, v in out.items()}
        return out["ids"], out["audio"], out["span"] > 0, out["span"], out["doc"]

    def _step(self, cache: KVCache, x, span_ids, doc_ids, layers) -> torch.Tensor:
        """Run `layers` on (B, T, H) new tokens that follow the cache's committed ones; does not commit."""
        cfg, T = self.config, x.shape[1]
        start, end = cache.length, cache.length + T
        cache.span_ids[:, start:end], cache.doc_ids[:, start:end] = span_ids, doc_ids
        positions = (torch.arange(start, end, device=x.device) - cache.pad[:, None]).clamp(min=0)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        keys = cache.span_ids[:, :end], cache.doc_ids[:, :end]
        masks = (build_attention_mask(*keys, num_queries=T), build_attention_mask(*keys, cfg.sliding_window, T))
        for block in layers:
            x = block(x, cos, sin, masks, cache)
        return x

    def _prefill(self, ids, latents, span_ids, num_layers: int, extra: int) -> tuple[KVCache, torch.Tensor]:
        ids, audio, audio_mask, span, doc = self._left_pad(ids, latents, span_ids)
        (B, T), E = ids.shape, self.model.embed_tokens.weight
        cache = KVCache(self.config, num_layers, B, T + extra, E.dtype, E.device)
        cache.pad = (doc < 0).sum(1)
        x = self.embed(ids, audio, audio_mask, torch.zeros(B, T, device=E.device))  # context audio is clean (t = 0)
        h = self._step(cache, x, span, doc, self.model.layers[:num_layers])
        cache.length = T
        return cache, h

    @torch.no_grad()
    def generate(self, ids, latents, span_ids, max_new_tokens: int, stop_ids=()) -> list[torch.Tensor]:
        """Greedy decoding over the U understanding layers; each row stops after its first stop id. ids, span_ids:
        lists of (T_i,) long; latents: list of (N_i, audio_dim), the row's clean audio frames (None when no row holds
        audio) -> the new tokens of each row (its stop id included when reached)."""
        U = self.config.num_hidden_layers
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}; ask for at least one token")
        cache, h = self._prefill(ids, latents, span_ids, U, max_new_tokens)
        B, dev = h.shape[0], h.device
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
        zeros = torch.zeros(B, 1, dtype=torch.long, device=dev)
        out, done = [], torch.zeros(B, dtype=torch.bool, device=dev)
        for step in range(max_new_tokens):
            token = self.lm_logits(self.model.norm(h[:, -1])).argmax(-1)     # (B,)
            out.append(token)
            done |= torch.isin(token, stop)
            if done.all() or step == max_new_tokens - 1:
                break
            h = self._step(cache, self.embed(token[:, None]), zeros, zeros, self.model.layers[:U])
            cache.length += 1
        tokens = torch.stack(out, 1).cpu()                                     # (B, n)
        ends = [next((i + 1 for i, x in enumerate(row.tolist()) if x in stop_ids), len(row)) for row in tokens]
        return [row[:end] for row, end in zip(tokens, ends)]

    @torch.no_grad()
    def prefix_cache(self, ids, latents, span_ids, num_frames: int) -> KVCache:
        """Run all K layers once over each prefix (rows as in generate) and keep room for num_frames."""
        cache, _ = self._prefill(ids, latents, span_ids, len(self.model.layers), num_frames)
        return cache

    @torch.no_grad()
    def denoise_step(self, cache: KVCache, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity (B, F, audio_dim) of the span being generated: noisy frames x (B, F, audio_dim) at time
        t (B,) or scalar attend to each other and to the cached prefix; only these F tokens run through the K layers."""
        B, F_, _ = x.shape
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(B)
        ones = torch.ones(B, F_, dtype=torch.bool, device=x.device)
        h = self.embed(torch.zeros(B, F_, dtype=torch.long, device=x.device), x, ones, t[:, None].expand(B, F_))
        span = (cache.span_ids[:, :cache.length].max() + 1).expand(B, F_)   # a span id no prefix token has
        h = self._step(cache, h, span, torch.zeros_like(span), self.model.layers)
        return self.velocity(self.audio_norm(h))

    # ---- loading -------------------------------------------------------------

    @classmethod
    def from_gemma(cls, hf_dir, num_generation_layers: int, audio_dim: int, **overrides) -> "SCT":
        """An SCT whose Gemma part (embeddings, U layers, final norm) is loaded strictly from a Hugging Face
        Gemma 2 directory (config.json + model.safetensors or shards with model.safetensors.index.json);
        the generation layers and audio parts keep init_weights. overrides: other SCTConfig fields."""
        hf_dir = Path(hf_dir)
        model = cls(gemma_config(hf_dir, num_generation_layers=num_generation_layers, audio_dim=audio_dim, **overrides))
        U = model.config.num_hidden_layers
        targets = {k: v for k, v in model.state_dict().items()
                   if k in ("model.embed_tokens.weight", "model.norm.weight")
                   or (k.startswith("model.layers.") and int(k.split(".")[2]) < U)}
        loaded, unexpected, bad_shapes = set(), [], []
        for file in safetensors_files(hf_dir):
            for name, tensor in read_safetensors(file).items():
                if name not in targets:
                    unexpected.append(f"{name} (in {file.name})")
                elif tensor.shape != targets[name].shape:
                    bad_shapes.append(f"{name}: {tuple(tensor.shape)} in {file.name}, "
                                      f"expected {tuple(targets[name].shape)}")
                else:
                    targets[name].copy_(tensor)
                    loaded.add(name)
        missing = sorted(set(targets) - loaded)
        if missing or unexpected or bad_shapes:
            problems = [("missing tensors", missing), ("unknown tensors", unexpected), ("wrong shapes", bad_shapes)]
            raise ValueError(f"{hf_dir} is not a Gemma 2 checkpoint matching its config.json:\n" + "".join(
                f"  {label}: {items[:20]}{' ...' if len(items) > 20 else ''} ({len(items)})\n"
                for label, items in problems if items))
        return model


# -----------------------------------------------------------------------------
# Hugging Face Gemma 2 checkpoints, read with the standard library and torch only

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file: an 8-byte little-endian header length N, N bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}} (offsets after the header), then raw bytes. The
    header length and every tensor's offsets are checked against the file size before anything is read."""
    path, fix = Path(path), "the file is truncated or corrupt; download it again"
    if sys.byteorder != "little":
        raise RuntimeError("read_safetensors assumes a little-endian machine, as the format does")
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise ValueError(f"{path}: a header of {n} bytes, but the file has {size} bytes; {fix}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:                  # not UTF-8, or not JSON
            raise ValueError(f"{path}: the header is not JSON ({e}); {fix}") from e
        header.pop("__metadata__", None)
        tensors = {}
        for name, info in header.items():
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; "
                                 f"supported: {list(SAFETENSORS_DTYPES)}")
            dtype, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
            if not 0 <= begin <= end <= size - 8 - n or end - begin != math.prod(info["shape"]) * dtype.itemsize:
                raise ValueError(f"{path}: tensor {name} takes bytes {begin} to {end} for shape {info['shape']} "
                                 f"{info['dtype']}, of {size - 8 - n} data bytes; {fix}")
            f.seek(8 + n + begin)
            tensors[name] = torch.frombuffer(bytearray(f.read(end - begin)), dtype=dtype).reshape(info["shape"])
    return tensors


def safetensors_files(hf_dir: Path) -> list[Path]:
    """The weight files of a Hugging Face directory: the shards named by the index, or model.safetensors."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = [hf_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    elif (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    else:
        raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json; "
                                f"download the whole checkpoint (e.g. `huggingface-cli download google/gemma-2-2b`)")
    if absent := [f.name for f in files if not f.is_file()]:
        raise FileNotFoundError(f"{index} names shards that are not in {hf_dir}: {absent}; finish the download")
    return files


def gemma_config(hf_dir: Path, **overrides) -> SCTConfig:
    """SCTConfig from a Gemma 2 config.json (both the 4.x rope_theta and the 5.x rope_parameters spelling)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; point at a Hugging Face Gemma 2 directory")
    hf = json.loads(path.read_text())
    rope = hf.get("rope_parameters") or {}
    layers = hf.get("layer_types") and ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                        for i in range(hf["num_hidden_layers"])]
    problems = [f"{key}={got!r} (need {want!r})" for key, got, want in [
        ("model_type", hf.get("model_type"), "gemma2"),
        ("hidden_activation", hf.get("hidden_activation") or hf.get("hidden_act"), "gelu_pytorch_tanh"),
        ("tie_word_embeddings", hf.get("tie_word_embeddings", True), True),
        ("attention_bias", hf.get("attention_bias", False), False),
        ("rope_type", rope.get("rope_type", "default"), "default"),
        ("layer_types", hf.get("layer_types"), layers)] if got != want]
    if problems:
        raise ValueError(f"{path}: not a Gemma 2 architecture this model reproduces: {', '.join(problems)}")
    kwargs = {f.name: hf[f.name] for f in fields(SCTConfig) if f.name in hf and f.name != "attn_implementation"}
    kwargs["rope_theta"] = hf.get("rope_theta", rope.get("rope_theta", 10_000.0))
    return SCTConfig(**{**kwargs, **overrides})


def count_parameters(config: SCTConfig) -> dict[str, int]:
    """Parameter counts by part, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = SCT(config)
    gemma, U = model.model, config.num_hidden_layers
    parts = {"text embedding (tied LM head)": [gemma.embed_tokens],
             "understanding layers + final norm": [*gemma.layers[:U], gemma.norm],
             "generation layers": gemma.layers[U:],
             "audio in/out, time embedding": [model.audio_in, model.time_embed, model.audio_norm, model.diffusion_head],
             "total": [model]}
    return {part: sum(p.numel() for m in modules for p in m.parameters()) for part, modules in parts.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Inspect the SCT presets.")
    parser.add_argument("--params", choices=sorted(SCT_PRESETS), required=True,
                        help="print the parameter count of this preset (built on the meta device, no memory)")
    args = parser.parse_args()
    print(asdict(SCT_PRESETS[args.params]))
    for part, n in count_parameters(SCT_PRESETS[args.params]).items():
        print(f"{part:>36}: {n:>13,} ({n / 1e9:.2f} B)")
