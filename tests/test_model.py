"""model.py against Hugging Face's Gemma 2, the attention-mask rules of paper Fig. 4, and the caches."""
import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from model import (SCT, SCTConfig, SCT_PRESETS, build_attention_mask, count_parameters, document_positions,
                   read_safetensors)
from tokenizer import VAE_PRESETS, CheckpointError, load_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# A tiny Gemma 2 with every feature switched on: sliding window shorter than the test sequences,
# query_pre_attn_scalar != head_dim, both soft-caps.
HF_KW = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
             max_position_embeddings=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
             attn_implementation="eager")
ROOT = Path(__file__).resolve().parents[1]
TINY = SCTConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_generation_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                 audio_dim=6)


@torch.no_grad()
def spread_weights(model, seed=0):
    """Large weights so every feature matters: non-zero (1 + w) norm weights, attention scores and LM
    logits well past their soft-caps (transformers' own init zeroes the norms and never reaches the caps)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        qk = "q_proj" in name or "k_proj" in name
        std = 0.5 if "norm" in name else 2.0 if "embed" in name else 1.0 if qk else 0.3
        p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="module")
def hf_gemma(tmp_path_factory):
    torch.manual_seed(0)
    hf = spread_weights(transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**HF_KW))).eval()
    path = tmp_path_factory.mktemp("gemma")
    hf.save_pretrained(path / "single")
    hf.save_pretrained(path / "sharded", max_shard_size="30KB")
    return hf, path


def test_config_sdpa_refuses_softcap():
    with pytest.raises(ValueError, match="cannot soft-cap"):
        SCTConfig(attn_implementation="sdpa")


def test_matches_huggingface_logits_single_and_sharded(hf_gemma):
    hf, path = hf_gemma
    assert len(list((path / "sharded").glob("*.safetensors"))) > 3, "the sharded save should have several shards"
    ids = torch.randint(0, 97, (2, 29), generator=torch.Generator().manual_seed(1))  # 29 > sliding window 8
    with torch.no_grad():
        ref = hf(ids).logits
    assert ref.abs().max() > 25, "test weights must push LM logits into the final soft-cap"
    for sub in ("single", "sharded"):
        model = SCT.from_gemma(path / sub, num_generation_layers=2, audio_dim=6).eval()
        assert model.config.query_pre_attn_scalar == 24 and model.config.sliding_window == 8
        with torch.no_grad():
            logits = model.lm_logits(text_forward(model, ids)[0])
        err = (logits - ref).abs().max().item()
        assert err < 1e-4, f"{sub}: max |ours - HF| = {err}"
        with torch.no_grad():
            assert torch.equal(model.lm_logits(model(ids)[0]), logits), "text-only forward(ids) must equal zero audio"
    # Every Gemma feature moves the logits, so the comparison above would catch its absence.
    base = model.config
    for change in [dict(attn_logit_softcapping=None), dict(sliding_window=None), dict(query_pre_attn_scalar=16)]:
        model.config = replace(base, **change)
        for block in model.model.layers:
            block.self_attn.config = model.config
        with torch.no_grad():
            off = (model.lm_logits(model(ids)[0]) - ref).abs().max().item()
        assert off > 1e-2, f"{change} changed logits by only {off}: the test would not see it"


def text_forward(model, ids, doc_ids=None):
    B, T = ids.shape
    return model(ids, torch.zeros(B, T, model.config.audio_dim), torch.zeros(B, T, dtype=torch.bool),
                 torch.zeros(B, T), torch.zeros(B, T, dtype=torch.long), doc_ids)


def test_greedy_decoding_matches_huggingface_generate(hf_gemma):
    hf, path = hf_gemma
    model = SCT.from_gemma(path / "single", num_generation_layers=1, audio_dim=6).eval()
    prompt = torch.randint(3, 97, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 11:]
    ours = model.generate([prompt[0]], [torch.zeros(0, 6)], [torch.zeros(11, dtype=torch.long)], max_new_tokens=14)[0]
    assert ours.tolist() == ref.tolist(), f"expected HF tokens {ref.tolist()}, got {ours.tolist()}"


# -----------------------------------------------------------------------------
# The SCT: mask behaviour, caches, checkpoints

def tiny_sct(**change):
    torch.manual_seed(0)
    return spread_weights(SCT(replace(TINY, **change)), seed=3).eval()


def layout(spans, T):
    """span_ids (1, T) from {span id: (start, end)}."""
    span = torch.zeros(1, T, dtype=torch.long)
    for k, (a, b) in spans.items():
        span[0, a:b] = k
    return span


def run(model, ids, audio, span, t=None, doc=None):
    mask = span > 0
    t = torch.where(mask, 0.5, 0.0) if t is None else t
    with torch.no_grad():
        h_text, h_audio = model(ids, audio, mask, t, span, doc)
    return torch.cat([h_text, h_audio], -1)


def test_mask_matches_rule_written_as_loops():
    span = torch.tensor([[0, 0, 1, 1, 1, 0, 2, 2, 0, 0, 1, 1, 0]])
    doc = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    for window in (None, 2):
        got = build_attention_mask(span, doc, window)[0, 0]
        for q in range(13):
            for k in range(13):
                same_doc = doc[0, q] == doc[0, k]
                ok = same_doc and (k <= q or (span[0, q] > 0 and span[0, q] == span[0, k]))
                ok = ok and (window is None or abs(q - k) < window)
                assert got[q, k] == ok, f"window {window}: query {q} key {k} expected {ok}"
    assert document_positions(doc).tolist() == [list(range(9)) + list(range(4))]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_later_tokens_never_change_earlier_outputs(impl):
    model = tiny_sct(attn_implementation=impl, attn_logit_softcapping=None if impl == "sdpa" else 50.0)
    T, g = 30, torch.Generator().manual_seed(4)
    span = layout({1: (4, 13), 2: (18, 26)}, T)                    # two spans, window 8 < span lengths
    ids = torch.randint(3, 97, (1, T), generator=g).masked_fill(span > 0, 0)
    audio = torch.randn(1, T, 6, generator=g)
    base = run(model, ids, audio, span)
    ids2, audio2 = ids.clone(), audio.clone()
    audio2[0, 20] += 3.0                                           # a frame of the later span
    ids2[0, 28] = (ids[0, 28] + 1) % 97                            # later text
    moved = (run(model, ids2, audio2, span) - base).abs().amax(-1)[0]
    assert moved[:18].max() < 1e-6, f"tokens before the later span moved by {moved[:18].max()}"
    assert moved[18:26].min() > 1e-4, f"every frame of the changed span must move, min {moved[18:26].min()}"
    # Changing one frame inside span 1 changes every frame output of span 1 (bidirectional), not the text before.
    for frame in (4, 8, 12):
        audio3 = audio.clone()
        audio3[0, frame] += 3.0
        moved = (run(model, ids, audio3, span) - base).abs().amax(-1)[0]
        assert moved[:4].max() < 1e-6 and moved[4:13].min() > 1e-4, f"frame {frame}: {moved[:13]}"


def test_packed_documents_are_independent():
    model = tiny_sct()
    g = torch.Generator().manual_seed(5)
    ids_a, ids_b = torch.randint(3, 97, (1, 10), generator=g), torch.randint(3, 97, (1, 16), generator=g)
    span_b = layout({1: (5, 12)}, 16)
    ids_b = ids_b.masked_fill(span_b > 0, 0)
    audio_b = torch.randn(1, 16, 6, generator=g)
    alone = run(model, ids_b, audio_b, span_b)
    packed = run(model, torch.cat([ids_a, ids_b], 1), torch.cat([torch.zeros(1, 10, 6), audio_b], 1),
                 torch.cat([torch.zeros(1, 10, dtype=torch.long), span_b], 1),
                 doc=torch.tensor([[0] * 10 + [1] * 16]))
    err = (packed[:, 10:] - alone).abs().max()
    assert err < 1e-5, f"document 2 packed after document 1 differs from document 2 alone by {err}"


def test_sdpa_and_flex_paths_equal_eager():
    g = torch.Generator().manual_seed(6)
    T = 20
    span = layout({1: (3, 12)}, T)
    ids = torch.randint(3, 97, (2, T), generator=g).masked_fill(span > 0, 0)
    audio = torch.randn(2, T, 6, generator=g)
    span = span.expand(2, T)
    doc = torch.tensor([[0] * 14 + [1] * 6, [0] * T])
    for cap, fast in [(None, "sdpa"), (50.0, "flex")]:
        ref = run(tiny_sct(attn_logit_softcapping=cap), ids, audio, span, doc=doc)
        got = run(tiny_sct(attn_logit_softcapping=cap, attn_implementation=fast), ids, audio, span, doc=doc)
        assert (got - ref).abs().max() < 1e-4, f"{fast} differs from eager by {(got - ref).abs().max()}"


def test_cached_greedy_equals_naive_with_audio_and_left_padding():
    model = tiny_sct()
    g = torch.Generator().manual_seed(7)
    rows = []
    for T, spans in [(15, {1: (3, 9)}), (10, {})]:
        span = layout(spans, T)[0]
        ids = torch.randint(3, 97, (T,), generator=g).masked_fill(span > 0, 0)
        rows.append((ids, torch.randn(int((span > 0).sum()), 6, generator=g), span))
    batched = model.generate(*map(list, zip(*rows)), max_new_tokens=9)
    for (ids, lat, span), got in zip(rows, batched):
        alone = model.generate([ids], [lat], [span], max_new_tokens=9)[0]
        assert alone.tolist() == got.tolist(), "batching changed a row"
        seq, sp, audio = ids[None].clone(), span[None].clone(), torch.zeros(1, len(ids), 6)
        audio[0, span > 0] = lat
        for _ in range(9):                                            # naive: a full forward per token
            h_text = model(seq, audio, sp > 0, torch.zeros(sp.shape), sp)[0]
            seq = torch.cat([seq, model.lm_logits(h_text[:, -1]).argmax(-1, keepdim=True)], 1)
            sp = torch.cat([sp, torch.zeros(1, 1, dtype=torch.long)], 1)
            audio = torch.cat([audio, torch.zeros(1, 1, 6)], 1)
        naive = seq[0, len(ids):].tolist()
        assert got.tolist() == naive, f"cached {got.tolist()} vs naive {naive}"
    stop = int(batched[0][-1])
    stopped = model.generate([rows[0][0]], [rows[0][1]], [rows[0][2]], max_new_tokens=9, stop_ids=[stop])[0]
    expected = batched[0][: batched[0].tolist().index(stop) + 1]
    assert stopped.tolist() == expected.tolist(), \
        f"stop id {stop}: expected {expected.tolist()}, got {stopped.tolist()}"


def test_prefix_cached_denoise_step_equals_full_forward():
    model = tiny_sct()
    g = torch.Generator().manual_seed(8)
    F_ = 7
    cond_span = layout({1: (2, 8)}, 13)[0]                           # cond: an earlier clean audio span
    prefixes = [(torch.randint(3, 97, (13,), generator=g).masked_fill(cond_span > 0, 0),
                 torch.randn(6, 6, generator=g), cond_span),
                (torch.randint(3, 97, (4,), generator=g), torch.zeros(0, 6), torch.zeros(4, dtype=torch.long))]
    x, t = torch.randn(2, F_, 6, generator=g), torch.tensor([0.7, 0.7])
    cache = model.prefix_cache(*map(list, zip(*prefixes)), num_frames=F_)
    v = model.denoise_step(cache, x, t)
    v_again = model.denoise_step(cache, x, t)                         # a second step reuses the same cache
    for b, (ids, lat, span) in enumerate(prefixes):
        P = len(ids)
        full_ids = torch.cat([ids, torch.zeros(F_, dtype=torch.long)])[None]
        full_span = torch.cat([span, torch.full((F_,), int(span.max()) + 1)])[None]
        audio = torch.zeros(1, P + F_, 6)
        audio[0, :P][span > 0] = lat
        audio[0, P:] = x[b]
        times = torch.cat([torch.zeros(P), torch.full((F_,), 0.7)])[None]
        with torch.no_grad():
            ref = model.velocity(model(full_ids, audio, full_span > 0, times, full_span)[1])[0, P:]
        assert (v[b] - ref).abs().max() < 1e-5, \
            f"row {b}: cached step differs from full forward by {(v[b] - ref).abs().max()}"
        assert torch.equal(v[b], v_again[b])


def test_activation_checkpointing_gives_same_gradients():
    model = tiny_sct().train()
    g = torch.Generator().manual_seed(9)
    span = layout({1: (2, 9)}, 12)
    ids, audio = torch.randint(3, 97, (1, 12), generator=g).masked_fill(span > 0, 0), torch.randn(1, 12, 6, generator=g)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        h_text, h_audio = model(ids, audio, span > 0, torch.full((1, 12), 0.3), span)
        (model.lm_logits(h_text).logsumexp(-1).sum() + model.velocity(h_audio).square().sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert len(grads[0]) == len(grads[1]) and (grads[0] - grads[1]).abs().max() < 1e-5


def test_reading_b_keeps_the_diffusion_loss_out_of_the_understanding_layers():
    """understanding_grad False (paper 4.1: "the first U layers are trained only by a LM head"): the forward is the
    same, the diffusion loss trains no understanding layer nor the text embedding, and it still reaches the
    generation layers as in reading A and, through the audio input embedding, audio_in and time_embed (t)."""
    model = tiny_sct().train()
    g = torch.Generator().manual_seed(2)
    span = layout({1: (2, 6), 2: (8, 12)}, 14)
    ids, audio = torch.randint(3, 97, (1, 14), generator=g).masked_fill(span > 0, 0), torch.randn(1, 14, 6, generator=g)
    t = torch.where(span == 2, 0.6, 0.0)
    out, grads = {}, {}
    for reading, flag in (("A", True), ("B", False)):
        model.zero_grad()
        model.understanding_grad = flag
        out[reading] = model(ids, audio, span > 0, t, span)
        model.velocity(out[reading][1]).square().sum().backward()            # a diffusion loss alone
        grads[reading] = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                          for n, p in model.named_parameters()}
    assert all(torch.equal(a, b) for a, b in zip(out["A"], out["B"])), "the forward must not depend on the reading"
    U = TINY.num_hidden_layers
    understanding = [n for n in grads["B"] if n.startswith("model.embed_tokens") or
                     (n.startswith("model.layers.") and int(n.split(".")[2]) < U)]
    assert all(grads["B"][n].abs().sum() == 0 for n in understanding), "B: no diffusion gradient below layer U"
    assert sum(grads["A"][n].abs().sum() for n in understanding) > 0, "A: the diffusion loss trains every layer"
    for n in grads["B"]:
        if n.startswith("model.layers.") and int(n.split(".")[2]) >= U or n.startswith("diffusion_head"):
            torch.testing.assert_close(grads["B"][n], grads["A"][n], msg=lambda m: f"{n}: {m}")
    for part in ("audio_in.weight", "time_embed.mlp.0.weight"):
        assert grads["B"][part].abs().sum() > 0, f"B: the diffusion loss must still train {part} (it carries t)"


def test_model_params_describes_the_toy_model_train_py_builds():
    out = subprocess.run([sys.executable, "model.py", "--params", "toy"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    toy_vae = VAE_PRESETS["toy"]
    assert f"'audio_dim': {2 * toy_vae.latent_dim}" in out, f"model.py --params toy prints {out.splitlines()[0]}"
    assert SCT_PRESETS["toy"].audio_dim == 2 * toy_vae.latent_dim


def test_audio_embedding_norm_follows_text_embedding_norm():
    model = SCT(TINY)
    with torch.no_grad():
        model.audio_in.weight.mul_(37.0)                             # the rule holds whatever the weight scale
        latents = torch.randn(1, 4000, 6)
        mask = torch.ones(1, 4000, dtype=torch.bool)
        model.time_embed.mlp[2].bias.fill_(0.0)
        model.time_embed.mlp[2].weight.fill_(0.0)                    # isolate the projection
        audio = model.embed(torch.zeros(1, 4000, dtype=torch.long), latents, mask, torch.zeros(1, 4000))
        audio_rms = audio.pow(2).mean().sqrt()
        text_rms = (model.model.embed_tokens.weight * 64 ** 0.5).pow(2).mean().sqrt()
    assert abs(audio_rms / text_rms - 1) < 0.05, f"audio RMS {audio_rms} vs text RMS {text_rms}"


def test_paper_scale_parameter_count():
    counts = count_parameters(SCT_PRESETS["audiochat"])
    gemma = counts["text embedding (tied LM head)"] + counts["understanding layers + final norm"]
    assert gemma == 2_614_341_888, f"Gemma 2 2B has 2,614,341,888 parameters, our Gemma part has {gemma:,}"
    assert round(counts["total"] / 1e9, 1) == 3.6, f"paper B.2: 3.6 B, got {counts['total']:,}"


# -----------------------------------------------------------------------------
# Loading: safetensors parsing, errors, checkpoints

def test_read_safetensors_dtypes(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 3, 2).bfloat16()}
    safetensors_torch.save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    got = read_safetensors(tmp_path / "x.safetensors")
    assert set(got) == set(tensors)
    for k in tensors:
        assert got[k].dtype == tensors[k].dtype and torch.equal(got[k], tensors[k]), k


def test_read_safetensors_checks_the_header_against_the_file_size(tmp_path):
    """A header length of 2^62 is refused before anything is allocated; offsets past the end are refused."""
    path = tmp_path / "x.safetensors"
    safetensors_torch.save_file({"a": torch.randn(3, 4)}, path)
    whole = path.read_bytes()
    n = int.from_bytes(whole[:8], "little")
    cases = {(2 ** 62).to_bytes(8, "little") + whole[8:]: f"a header of {2 ** 62} bytes, but the file has {len(whole)}",
             whole[:4]: "a header of .* bytes, but the file has 4 bytes",
             whole[:8 + n] + whole[8 + n: -20]: r"tensor a takes bytes 0 to 48 for shape \[3, 4\] F32, of 28 data",
             whole[:8] + b"{" * n + whole[8 + n:]: "the header is not JSON"}
    for data, message in cases.items():
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"x.safetensors: {message}.*truncated or corrupt; download it again"):
            read_safetensors(path)


def gemma_dir(src, dst, edit=None, config=None):
    """Copy of a single-file Gemma directory with its tensors and/or config edited."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    tensors = safetensors_torch.load_file(src / "model.safetensors")
    safetensors_torch.save_file(edit(tensors) if edit else tensors, dst / "model.safetensors")
    return dst


def test_loader_errors(hf_gemma, tmp_path):
    _, path = hf_gemma
    src = path / "single"
    with pytest.raises(FileNotFoundError, match="config.json"):
        SCT.from_gemma(tmp_path, 1, 6)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SCT.from_gemma(tmp_path / "empty", 1, 6)
    index = json.loads((path / "sharded" / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    (tmp_path / "empty" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00099-of-00099"):
        SCT.from_gemma(tmp_path / "empty", 1, 6)
    with pytest.raises(ValueError, match=r"missing tensors: \['model.norm.weight'\]"):
        SCT.from_gemma(gemma_dir(src, tmp_path / "missing",
                                 lambda d: {k: v for k, v in d.items() if k != "model.norm.weight"}), 1, 6)
    with pytest.raises(ValueError, match=r"unknown tensors: \['model.extra.weight"):
        SCT.from_gemma(gemma_dir(src, tmp_path / "extra", lambda d: {**d, "model.extra.weight": torch.zeros(2)}), 1, 6)
    with pytest.raises(ValueError, match=r"wrong shapes: \['model.layers.0.mlp.down_proj.weight: \(64, 96\)"):
        SCT.from_gemma(gemma_dir(src, tmp_path / "shape", config={"intermediate_size": 80}), 1, 6)
    with pytest.raises(ValueError, match="model_type"):
        SCT.from_gemma(gemma_dir(src, tmp_path / "llama", config={"model_type": "llama"}), 1, 6)


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = tiny_sct()
    torch.save({"kind": "sct", "config": asdict(model.config), "model": model.state_dict()}, tmp_path / "sct.pt")
    loaded = load_model(SCT, tmp_path / "sct.pt").eval()
    ids = torch.randint(3, 97, (1, 9))
    assert torch.equal(text_forward(model, ids)[0], text_forward(loaded, ids)[0])
    with pytest.raises(CheckpointError, match="absent.pt: no such checkpoint"):
        load_model(SCT, tmp_path / "absent.pt")
    torch.save({"kind": "vae", "config": {}, "model": {}}, tmp_path / "vae.pt")
    with pytest.raises(ValueError, match="expected a 'sct' checkpoint, found 'vae'"):
        load_model(SCT, tmp_path / "vae.pt")
    sd = {k: v for k, v in model.state_dict().items() if k != "audio_norm.weight"}
    torch.save({"kind": "sct", "config": asdict(model.config), "model": sd}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="missing.*audio_norm.weight"):
        load_model(SCT, tmp_path / "partial.pt")
