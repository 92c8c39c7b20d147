"""Tests for diffusion.py on problems with a known answer.

The analytic problem: data x0 ~ N(mu, Sigma). Its exact VE denoiser is
D(x, s) = mu + Sigma (Sigma + s^2 I)^-1 (x - mu), and the probability-flow ODE moves x - mu along the
eigenvectors of Sigma, each coordinate scaled by sqrt(lambda + s^2): both are written out here,
independently of diffusion.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import diffusion as dd

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)


def exact_denoiser(x, s):
    """E[x0 | x0 + s eps = x] for Gaussian data; x [B, 2], s [B]."""
    K = SIGMA + s[:, None, None] ** 2 * torch.eye(2, dtype=SIGMA.dtype)       # [B, 2, 2]
    return MU + (SIGMA @ torch.linalg.solve(K, (x - MU)[..., None]))[..., 0]


def exact_v(x_t, t):
    """E[v | x_t] for Gaussian data in the VP cosine process, written from its definition."""
    a, s = torch.cos(t * math.pi / 2)[:, None], torch.sin(t * math.pi / 2)[:, None]
    K = a[..., None] ** 2 * SIGMA + s[..., None] ** 2 * torch.eye(2, dtype=SIGMA.dtype)
    r = torch.linalg.solve(K, (x_t - a * MU)[..., None])[..., 0]          # K^-1 (x_t - a mu)
    x0 = MU + a * (r @ SIGMA)                                               # E[x0 | x_t]
    eps = s * r                                                             # E[eps | x_t]
    return a * eps - s * x0


def exact_flow(x, s0, s1):
    """Probability-flow ODE solution from VE sigma s0 to s1, x [B, 2]."""
    lam, U = torch.linalg.eigh(SIGMA)
    scale = torch.sqrt((lam + s1 ** 2) / (lam + s0 ** 2))
    return MU + ((x - MU) @ U) * scale @ U.T


def kdiffusion_dpmpp_2m(model, x, sigmas):
    """k-diffusion's sample_dpmpp_2m (k_diffusion/sampling.py), written out with its own names."""
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()
    t_fn = lambda sigma: sigma.log().neg()
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


# -----------------------------------------------------------------------------
# The noise process

def test_schedule_endpoints_and_conversions():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    alpha, sigma = dd.alpha_sigma(t)
    assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones_like(t)), "VP: alpha^2 + sigma^2 must be 1"
    assert alpha[0] == 1 and sigma[0] == 0, f"t = 0 must be clean, got alpha {alpha[0]}, sigma {sigma[0]}"
    assert abs(alpha[-1]) < 1e-15 and sigma[-1] == 1, f"t = 1 must be pure noise, got {alpha[-1]}, {sigma[-1]}"
    s = dd.t_to_sigma(t[:-1])
    assert torch.allclose(s, sigma[:-1] / alpha[:-1]), "VE sigma must be sigma / alpha"
    assert torch.allclose(dd.sigma_to_t(s), t[:-1], atol=1e-12), "sigma_to_t must invert t_to_sigma"

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    tb = torch.tensor([0.1, 0.5, 0.9])                                     # one t per row of [B, F, D]
    x_t, v = dd.add_noise(x0, tb, eps)
    a, sg = torch.cos(tb * math.pi / 2)[:, None, None], torch.sin(tb * math.pi / 2)[:, None, None]
    assert torch.allclose(x_t, a * x0 + sg * eps) and torch.allclose(v, a * eps - sg * x0)
    x0_back, eps_back = dd.v_to_x0_eps(x_t, v, tb)
    assert torch.allclose(x0_back, x0, atol=1e-6) and torch.allclose(eps_back, eps, atol=1e-6)


def test_vdenoiser_is_the_exact_denoiser_and_kdiffusion_vdenoiser():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64) * 3
    s = torch.tensor([0.002, 0.1, 0.7, 1.0, 5.0, 100.0], dtype=torch.float64)
    got = dd.vdenoiser(exact_v)(x, s)
    want = exact_denoiser(x, s)
    assert torch.allclose(got, want, atol=1e-9), f"max error {(got - want).abs().max():.2e}"
    # k-diffusion VDenoiser with sigma_data = 1: c_skip, c_out, c_in and t = atan(s) 2 / pi.
    model = lambda x_t, t: torch.sin(x_t) * (1 + t[:, None])
    c = s[:, None]
    root = torch.sqrt(c ** 2 + 1)
    kd = model(x / root, torch.atan(s) * 2 / math.pi) * (-c / root) + x / (c ** 2 + 1)
    assert torch.allclose(dd.vdenoiser(model)(x, s), kd, atol=1e-12)


# -----------------------------------------------------------------------------
# Samplers

def test_karras_sigmas_end_exactly_at_zero():
    n, lo, hi, rho = 10, 0.002, 100.0, 7.0
    sig = dd.get_sigmas_karras(n, lo, hi, rho)
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    want = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    assert sig.shape == (n + 1,), f"expected {n + 1} sigmas, got {sig.shape}"
    assert torch.allclose(sig[:-1], want) and sig[-1] == 0, f"got {sig.tolist()}"
    assert math.isclose(sig[0], hi) and math.isclose(sig[-2], lo)
    assert (sig[1:] < sig[:-1]).all(), "sigmas must strictly decrease: no repeated last sigma (diffusers #6477)"
    assert dd.get_sigmas_karras(1, lo, hi).tolist() == pytest.approx([hi, 0.0])
    with pytest.raises(ValueError, match="sigma_min"):
        dd.get_sigmas_karras(5, 1.0, 0.5)


def test_dpmpp_2m_matches_kdiffusion_formulas():
    denoise = lambda x, s: torch.tanh(x) / (1 + s[:, None]) + 0.1 * x  # nonlinear, sigma-dependent
    sig = dd.get_sigmas_karras(12, 0.01, 50.0)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 50
    calls = []
    ours = dd.sample_dpmpp_2m(denoise, x, sig, callback=calls.append)
    theirs = kdiffusion_dpmpp_2m(denoise, x, sig)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12), f"max diff {(ours - theirs).abs().max():.2e}"
    assert len(calls) == 12, f"expected one denoiser call per step, got {len(calls)}"
    assert torch.equal(ours, calls[-1]["denoised"]), "the step into sigma = 0 must return the denoised value"


def test_dpmpp_2m_is_second_order_against_the_exact_ode():
    lo, hi = 0.002, 100.0
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * hi
    want = exact_flow(x, hi, lo)
    errors, orders = [], []
    for intervals in (12, 24, 48, 96, 192):
        sig = dd.get_sigmas_karras(intervals + 1, lo, hi)[:-1]          # stop at sigma_min, before the jump to 0
        got = dd.sample_dpmpp_2m(exact_denoiser, x, sig)
        errors.append((got - want).abs().max().item())
        if len(errors) > 1:
            orders.append(math.log2(errors[-2] / errors[-1]))
    print(f"\nDPM-Solver++(2M) max error vs exact ODE for 12..192 steps: {['%.2e' % e for e in errors]}; "
          f"observed order {['%.2f' % p for p in orders]}")
    assert all(b < a for a, b in zip(errors, errors[1:])), f"error must shrink as steps double: {errors}"
    assert all(1.8 < p < 2.3 for p in orders[1:]), f"expected order 2, observed {orders}"


def test_sample_25_steps_matches_gaussian_mean_and_covariance():
    """The whole path (seeded noise, VDenoiser, Karras, DPM-Solver++) within 4 standard errors at N = 4000.
    25 steps still carry a discretisation bias of about 5 % of the variance, 2.3 standard errors here
    (bench/diffusion_schedule.py computes it exactly); the 150-step test below is sampling-free."""
    cfg = dd.DiffusionConfig(steps=25)
    N = 4000
    x = dd.sample(exact_v, (N, 2), cfg, torch.Generator().manual_seed(4), dtype=torch.float64)
    mean, cov = x.mean(0), torch.cov(x.T)
    se_mean = torch.sqrt(SIGMA.diagonal() / N)
    se_cov = torch.sqrt((SIGMA.diagonal()[:, None] * SIGMA.diagonal()[None] + SIGMA ** 2) / N)
    assert ((mean - MU).abs() < 4 * se_mean).all(), f"mean {mean.tolist()} vs {MU.tolist()} (se {se_mean.tolist()})"
    assert ((cov - SIGMA).abs() < 4 * se_cov).all(), f"cov {cov.tolist()} vs {SIGMA.tolist()} (se {se_cov.tolist()})"


def test_150_steps_output_distribution_is_exact_to_one_percent():
    """Paper D's 150 steps, without sampling error: the exact denoiser is affine in x, so the whole
    sampler is x_out = b + A x_in, and with x_in = sigma_max * noise the output law is N(b, sigma_max^2 A A^T)."""
    cfg = dd.DiffusionConfig()
    sig = dd.get_sigmas_karras(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    basis = torch.cat([torch.zeros(1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)])
    out = dd.sample_dpmpp_2m(dd.vdenoiser(exact_v), basis, sig)
    b, A = out[0], out[1:] - out[0]
    cov = cfg.sigma_max ** 2 * A.T @ A
    # The only mean bias allowed is the prior mismatch: x_in lacks mu, which arrives shrunk by ~1/sigma_max.
    assert ((b - MU).abs() < 2 * MU.abs() / cfg.sigma_max).all(), f"mean {b.tolist()} vs {MU.tolist()}"
    assert ((cov - SIGMA).abs() < 0.01 * SIGMA.abs().max()).all(), f"cov {cov.tolist()} vs {SIGMA.tolist()}"


def test_sample_is_seeded_by_the_callers_generator():
    cfg = dd.DiffusionConfig(steps=5)
    a = dd.sample(exact_v, (8, 2), cfg, torch.Generator().manual_seed(7), dtype=torch.float64, progress=True)
    b = dd.sample(exact_v, (8, 2), cfg, torch.Generator().manual_seed(7), dtype=torch.float64)
    c = dd.sample(exact_v, (8, 2), cfg, torch.Generator().manual_seed(8), dtype=torch.float64)
    assert torch.equal(a, b), "the same seed must give the same sample"
    assert not torch.allclose(a, c), "another seed must give another sample"


# -----------------------------------------------------------------------------
# Classifier-free guidance

def test_cfg_one_batched_call_and_weight_one_is_conditional():
    calls = []

    def v_both(x_t, t):
        calls.append(x_t.shape[0])
        B = x_t.shape[0] // 2
        shift = torch.cat([torch.ones(B), -torch.ones(B)])[:, None]          # cond rows first
        return torch.sin(x_t) * t[:, None] + shift

    x_t, t = torch.randn(3, 4), torch.rand(3)
    v_c, v_u = torch.sin(x_t) * t[:, None] + 1, torch.sin(x_t) * t[:, None] - 1
    assert torch.equal(dd.guided(v_both, 1.0)(x_t, t), v_c), "w = 1 must give the conditional prediction"
    assert torch.allclose(dd.guided(v_both, 3.0)(x_t, t), v_u + 3.0 * (v_c - v_u))
    assert calls == [6, 6], f"cond and uncond must be one call on 2B rows, got calls of sizes {calls}"
    calls.clear()
    dd.sample(dd.guided(v_both, 3.0), (3, 4), dd.DiffusionConfig(steps=7), torch.Generator().manual_seed(0))
    assert calls == [6] * 7, f"expected 7 batched calls of 6 rows, got {calls}"


# -----------------------------------------------------------------------------
# Diffusion Forcing and CFG dropout

def test_span_times_are_independent_per_model_span_and_read_spans_are_clean():
    g = torch.Generator().manual_seed(5)
    is_model = torch.tensor([False, True, True, True])           # an uploaded clip, then three generated turns
    t = torch.stack([dd.sample_span_times(is_model, g, clean_context_prob=0.0) for _ in range(4000)])
    assert (t[:, 0] == 0).all(), f"a span the model only reads is never noised, got t up to {t[:, 0].max()}"
    assert (t[:, 1:] > 0).all() and (t[:, 1:] < 1).all()
    assert torch.allclose(t[:, 1:].mean(0), torch.full((3,), 0.5), atol=0.03), f"means {t.mean(0).tolist()}"
    corr = torch.corrcoef(t[:, 1:].T)
    assert (corr - torch.eye(3)).abs().max() < 0.06, f"span times must be independent, correlation {corr}"
    for layout in ([False], [False, False]):                     # understanding, captioning, ASR: only read
        got = torch.stack([dd.sample_span_times(torch.tensor(layout), g, 0.25) for _ in range(200)])
        assert (got == 0).all(), f"a document without model audio is never noised, got {got.max()}"


def test_clean_context_layout_matches_inference():
    g = torch.Generator().manual_seed(6)
    is_model = torch.tensor([False, True, False, True, False])   # last model span is span 4 (index 3)
    t = torch.stack([dd.sample_span_times(is_model, g, clean_context_prob=0.25) for _ in range(4000)])
    clean = t[:, 1] == 0                                          # the one model span of the context
    assert (t[:, 3] > 0).all(), "the target (last model span) must always be noised"
    assert (t[:, [0, 2, 4]] == 0).all(), "user spans are read, never noised"
    assert abs(clean.float().mean() - 0.25) < 0.03, f"clean layout frequency {clean.float().mean():.3f}, expected 0.25"
    no_model = dd.sample_span_times(torch.tensor([False, False]), g, clean_context_prob=1.0)
    assert (no_model == 0).all(), f"without model audio every span is context, got {no_model}"
    mask = dd.span_loss_mask(torch.tensor([0.3, 0.0, 0.5, 0.0]), torch.tensor([False, True, True, False]))
    assert mask.tolist() == [False, False, True, False], "loss only on noised model spans"


def test_span_to_tokens_and_noising_a_conversation():
    span_ids = torch.tensor([0, 0, 1, 1, 0, 2, 2, 2, 0, 3, 0])
    is_model = torch.tensor([False, True, True])
    t_span = torch.tensor([0.2, 0.0, 0.7])
    t_tok = dd.span_to_tokens(t_span, span_ids)
    assert t_tok.tolist() == pytest.approx([0, 0, 0.2, 0.2, 0, 0, 0, 0, 0, 0.7, 0])
    m_tok = dd.span_to_tokens(dd.span_loss_mask(t_span, is_model), span_ids)
    assert m_tok.tolist() == [False] * 9 + [True, False], f"got {m_tok.tolist()}"
    batched = dd.span_to_tokens(torch.stack([t_span, t_span + 0.1]), torch.stack([span_ids, span_ids]))
    assert torch.allclose(batched[1], torch.where(span_ids > 0, t_tok + 0.1, 0.0))
    audio = span_ids > 0
    x0, eps = torch.randn(int(audio.sum()), 4), torch.randn(int(audio.sum()), 4)
    x_t, v = dd.add_noise(x0, t_tok[audio], eps)
    assert torch.equal(x_t[2:5], x0[2:5]), "a clean span (t = 0) must enter unchanged"


def test_cfg_dropout_policy():
    g = torch.Generator().manual_seed(9)
    is_model = torch.tensor([False, True, False, True])          # model spans are ids 2 and 4
    picks = [dd.sample_uncond_span(is_model, g, cfg_dropout=0.1) for _ in range(4000)]
    dropped = [k for k in picks if k]
    assert abs(len(dropped) / 4000 - 0.1) < 0.015, f"dropout rate {len(dropped) / 4000}, expected 0.1"
    assert set(dropped) == {2, 4}, f"only model spans may become unconditional documents, got {set(dropped)}"
    assert abs(dropped.count(2) / len(dropped) - 0.5) < 0.1, "the span is chosen uniformly"
    assert dd.sample_uncond_span(torch.tensor([True, False]), g, cfg_dropout=0.0) == 0
    assert dd.sample_uncond_span(torch.tensor([False, False]), g, cfg_dropout=1.0) == 0


# -----------------------------------------------------------------------------
# The Transfusion Forcing loss

def _batch(n_text=5, n_audio=6, V=11, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_text, V, generator=g, requires_grad=True)
    labels = torch.randint(V, (n_text,), generator=g)
    v_pred = torch.randn(n_audio, D, generator=g, requires_grad=True)
    v_target = torch.randn(n_audio, D, generator=g)
    return logits, labels, v_pred, v_target


def test_loss_matches_eq12_only_where_it_belongs():
    logits, labels, v_pred, v_target = _batch()
    labels[1] = -100
    mask = torch.tensor([True, True, False, True, False, True])
    total, lm, diff = dd.transfusion_loss(logits, labels, v_pred, v_target, mask, loss_weight=5.0)
    keep = labels != -100
    lm_want = -F.log_softmax(logits[keep], -1).gather(1, labels[keep][:, None]).mean()
    diff_want = ((v_pred[mask] - v_target[mask]) ** 2).mean()
    assert torch.allclose(lm, lm_want) and torch.allclose(diff, diff_want), f"got {lm}, {diff}"
    assert torch.allclose(total, lm_want + 5.0 * diff_want), "lambda must multiply the diffusion term"
    v2, l2 = v_pred.detach().clone(), logits.detach().clone()
    v2[~mask] += 100.0
    l2[1] += 100.0
    again = dd.transfusion_loss(l2, labels, v2, v_target, mask)
    assert torch.allclose(again[0], total), "masked frames and ignored labels must not change the loss"


def test_loss_gradients_reach_both_parts():
    head = torch.nn.Linear(8, 11 + 4)
    h = torch.randn(7, 8)
    out = head(h)
    logits, v_pred = out[:4, :11], out[4:, 11:]
    total, lm, diff = dd.transfusion_loss(logits, torch.randint(11, (4,)), v_pred, torch.randn(3, 4))
    g_lm = torch.autograd.grad(lm, head.weight, retain_graph=True)[0]
    g_diff = torch.autograd.grad(diff, head.weight)[0]
    assert g_lm[:11].abs().sum() > 0 and g_lm[11:].abs().sum() == 0, "LM gradient must reach the LM rows only"
    assert g_diff[11:].abs().sum() > 0 and g_diff[:11].abs().sum() == 0, "diffusion gradient must reach the v rows only"


@pytest.mark.parametrize("empty", ["audio", "text"])
def test_loss_with_no_audio_or_no_text(empty):
    logits, labels, v_pred, v_target = _batch(n_text=0 if empty == "text" else 5, n_audio=0 if empty == "audio" else 6)
    total, lm, diff = dd.transfusion_loss(logits, labels, v_pred, v_target)
    part = diff if empty == "audio" else lm
    assert part.item() == 0.0 and torch.isfinite(total), f"empty {empty}: got {part}, total {total}"
    total.backward()
    for name, x in (("logits", logits), ("v_pred", v_pred)):
        assert x.grad is not None and torch.isfinite(x.grad).all(), f"{name} gradient must exist and be finite"
    # All labels ignored behaves like no text.
    _, lm_ignored, _ = dd.transfusion_loss(*_batch()[:1], torch.full((5,), -100), *_batch()[2:])
    assert lm_ignored.item() == 0.0


def test_chunked_cross_entropy_equals_the_full_loss_and_gradients():
    g = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(16, 300, bias=False)

    def capped(h):                                                # soft-capped logits, as the SCT's LM head
        return 30 * torch.tanh(head(h) / 30)
    h, labels = torch.randn(37, 16, generator=g, requires_grad=True), torch.randint(300, (37,), generator=g)
    labels[[3, 20]] = -100
    v_pred, v_target = torch.randn(5, 4, generator=g, requires_grad=True), torch.randn(5, 4, generator=g)
    full = dd.transfusion_loss(capped(h), labels, v_pred, v_target)[0]
    want = torch.autograd.grad(full, [h, head.weight, v_pred])
    for chunk in (1, 8, 37, 1000):                                # slices of 1, uneven slices, one, more than N
        loss = dd.transfusion_loss(h, labels, v_pred, v_target, head=capped, chunk=chunk)[0]
        got = torch.autograd.grad(loss, [h, head.weight, v_pred])
        assert torch.allclose(loss, full, rtol=1e-6), f"chunk {chunk}: loss {loss.item()} vs full {full.item()}"
        for name, a, b in zip(("h", "head", "v_pred"), got, want):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), f"chunk {chunk}, {name}: {(a - b).abs().max():.2e}"
    empty = dd.transfusion_loss(h[:0], labels[:0], v_pred, v_target, head=capped, chunk=8)[1]
    assert empty.item() == 0.0 and torch.autograd.grad(empty, head.weight)[0].abs().sum() == 0, "no text: LM loss 0"


def test_global_normalisers_make_ddp_equal_one_process():
    logits, labels, v_pred, v_target = _batch(n_text=6, n_audio=8, seed=3)
    total = dd.transfusion_loss(logits, labels, v_pred, v_target)[0]
    g_one = torch.autograd.grad(total, [logits, v_pred])
    ranks = [(slice(0, 1), slice(0, 6)), (slice(1, 6), slice(6, 8))]    # unequal token counts per rank
    world = len(ranks)
    n_text, n_audio = 6 / world, 8 / world                             # all_reduce(count) / world_size
    grads = [torch.zeros_like(logits), torch.zeros_like(v_pred)]
    for tx, au in ranks:
        loss = dd.transfusion_loss(logits[tx], labels[tx], v_pred[au], v_target[au], n_text=n_text, n_audio=n_audio)[0]
        for acc, gr in zip(grads, torch.autograd.grad(loss, [logits, v_pred])):
            acc += gr / world                                          # DDP averages gradients over ranks
    for a, b in zip(grads, g_one):
        assert torch.allclose(a, b, atol=1e-7), f"max diff {(a - b).abs().max():.2e}"


def test_config_rejects_bad_values():
    assert dd.DiffusionConfig().loss_weight == 5.0 and dd.DiffusionConfig().steps == 150
    with pytest.raises(ValueError, match="cfg_dropout"):
        dd.DiffusionConfig(cfg_dropout=1.5)
    with pytest.raises(ValueError, match="sigma_min"):
        dd.DiffusionConfig(sigma_min=10.0, sigma_max=1.0)
