"""Diffusion for AudioChat: the noise process, Diffusion Forcing, the Transfusion Forcing loss,
classifier-free guidance, Karras sigmas and the DPM-Solver++(2M) sampler.

Paper: section 4.2 (Eqs. 7-12), appendix B.2 (v-prediction), appendix D (inference: 150 steps,
CFG 3.0, the Karras schedule, DPM-Solver++). This file imports no project file: the network enters
as a plain function, so everything here is tested on problems with a known answer.

Conventions (the schedule is written once, below):
  t in [0, 1] is diffusion time, t = 0 clean data, t = 1 pure noise.
  VP cosine schedule: alpha(t) = cos(pi t / 2), sigma(t) = sin(pi t / 2), so alpha^2 + sigma^2 = 1.
  x_t = alpha x0 + sigma eps, and the network predicts v = alpha eps - sigma x0 (Salimans & Ho 2022).
  The sampler works in VE form, as k-diffusion does: x = x_t / alpha = x0 + s eps with
  s = sigma / alpha = tan(pi t / 2), and back t = 2/pi atan(s).

At inference (sample.py): x0 = sample(guided(v_both, cfg.cfg_weight), (B, F, D), cfg, generator).
Test: python -m pytest -q tests/test_diffusion.py
"""
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import trange

VFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]       # v_fn(x_t [B, ...], t [B]) -> v [B, ...]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # denoise(x [B, ...], s [B]) -> x0 [B, ...]


@dataclass
class DiffusionConfig:
    loss_weight: float = field(default=5.0, metadata={
        "help": "lambda of Eq. 12, L = L_LM + lambda * L_diffusion; 5.0 worked best in the paper (section 4.2)"})
    clean_context_prob: float = field(default=0.25, metadata={
        "help": "probability that a training conversation is laid out as at inference: every audio span clean but "
                "its last model span; otherwise each model span draws its own t ~ U(0, 1) (Eq. 11, sample_span_times)"})
    cfg_dropout: float = field(default=0.1, metadata={
        "help": "probability that a conversation is replaced by the unconditional document of one model span "
                "(sample_uncond_span); 0.1 as lucidrains' Transfusion, stable-audio-tools, BAGEL"})
    cfg_weight: float = field(default=3.0, metadata={
        "help": "guidance weight w of v = v_u + w (v_c - v_u); appendix D: 3.0; 1 = no guidance"})
    steps: int = field(default=150, metadata={
        "help": "DPM-Solver++(2M) steps = denoiser calls per span, each a 2B batch with CFG; appendix D: 150"})
    # Detail with a std near sigma_min is shrunk by the last denoiser call: at 150 steps 0.002 keeps a std of
    # 0.01 (-40 dB of unit-variance latents) within 4 % in variance, 0.01 halves it (bench/diffusion_schedule.py).
    sigma_min: float = field(default=0.002, metadata={
        "help": "smallest non-zero VE sigma of the Karras schedule (appendix D), t = 0.0013"})
    # The first x = sigma_max * noise lacks the data mean; that gap reaches the output shrunk by std / sigma_max
    # (1 % of the mean at std 1). 500 would cut it to 0.2 % but doubles the variance error at 25 steps.
    sigma_max: float = field(default=100.0, metadata={"help": "largest VE sigma of the Karras schedule, t = 0.9936"})
    rho: float = field(default=7.0, metadata={"help": "rho of the Karras schedule (Karras et al. 2022, Eq. 5)"})

    def __post_init__(self):
        for name in ("clean_context_prob", "cfg_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DiffusionConfig.{name}={getattr(self, name)} must lie in [0, 1]")
        if self.steps < 1:
            raise ValueError(f"DiffusionConfig.steps={self.steps} must be at least 1")
        if not 0.0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"DiffusionConfig needs 0 < sigma_min < sigma_max, got "
                             f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")


# -----------------------------------------------------------------------------
# The noise process

def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Append trailing singleton dims so a time [B] or [N] broadcasts against x [B, ...]."""
    return t.reshape(*t.shape, *([1] * (x.dim() - t.dim())))


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VP cosine schedule: (alpha, sigma) = (cos(pi t / 2), sin(pi t / 2)) for t in [0, 1]."""
    return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)


def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """VE sigma s = sigma(t) / alpha(t) = tan(pi t / 2) of diffusion time t (inf at t = 1)."""
    return torch.tan(t * math.pi / 2)


def sigma_to_t(s: torch.Tensor) -> torch.Tensor:
    """Diffusion time t = 2/pi atan(s) of a VE sigma s >= 0."""
    return torch.atan(s) * (2 / math.pi)


def add_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, v_target) = (alpha x0 + sigma eps, alpha eps - sigma x0); x0, noise [..., D], t leading dims of x0."""
    alpha, sigma = alpha_sigma(_expand(t, x0))
    return alpha * x0 + sigma * noise, alpha * noise - sigma * x0


def v_to_x0_eps(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) = (alpha x_t - sigma v, sigma x_t + alpha v): the inverse of add_noise."""
    alpha, sigma = alpha_sigma(_expand(t, x_t))
    return alpha * x_t - sigma * v, sigma * x_t + alpha * v


def vdenoiser(v_fn: VFn) -> Denoiser:
    """Turn a v-prediction model v_fn(x_t, t) into a VE denoiser D(x, s) -> x0 (k-diffusion's VDenoiser)."""
    def denoise(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s_ = _expand(s, x)
        c_in = 1 / torch.sqrt(1 + s_ ** 2)        # = alpha(t): the VP input x_t = alpha x
        v = v_fn(x * c_in, sigma_to_t(s))
        return x * c_in ** 2 - v * (s_ * c_in)    # alpha x_t - sigma v, with sigma(t) = s alpha
    return denoise


# -----------------------------------------------------------------------------
# Diffusion Forcing (Eq. 11) and CFG dropout: one noise level per audio span

def sample_span_times(span_is_model: torch.Tensor, generator: torch.Generator | None = None,
                      clean_context_prob: float = 0.25) -> torch.Tensor:
    """One diffusion time per audio span of one conversation, span_is_model [N] -> t [N] in [0, 1).

    The rule: a span the model generates (a model turn's audio) is noised, a span it only reads (a user's
    clip: the input of understanding, captioning, ASR, and the uploaded clip of an edit) is clean, t = 0,
    as it is at inference. Each model span draws its own t ~ U(0, 1) (Diffusion Forcing, Eq. 11: "a
    different timestep t_s for each generation turn"), so the model cannot learn to copy earlier turns'
    audio (section 4.2) and every turn trains in parallel. With probability clean_context_prob the
    conversation is laid out as at inference: all spans clean but the last model span (the target).
    Clean spans carry no diffusion loss (span_loss_mask).
    """
    t = torch.rand(span_is_model.numel(), generator=generator) * span_is_model       # a span only read: t = 0
    if torch.rand((), generator=generator).item() < clean_context_prob:
        target = span_is_model.nonzero().flatten()[-1:]            # the last model span, if any
        t = torch.zeros_like(t).index_copy(0, target, t[target])
    return t


def span_loss_mask(t: torch.Tensor, span_is_model: torch.Tensor) -> torch.Tensor:
    """[N] bool: spans that carry diffusion loss, i.e. model audio that was noised (t > 0)."""
    return span_is_model & (t > 0)


def span_to_tokens(values: torch.Tensor, span_ids: torch.Tensor) -> torch.Tensor:
    """Spread one value per span [..., N] (a t, a loss mask) over tokens by span ids [..., T] -> [..., T].

    Span ids are 0 at text and k = 1..N at the frames of span k; text gets 0 (t = 0, mask False).
    """
    zero = values.new_zeros(*values.shape[:-1], 1)
    return torch.cat([zero, values], dim=-1).gather(-1, span_ids)


def sample_uncond_span(span_is_model: torch.Tensor, generator: torch.Generator | None = None,
                       cfg_dropout: float = 0.1) -> int:
    """CFG dropout for one conversation: 0 keeps it, k >= 1 replaces it by model span k alone.

    With probability cfg_dropout one model span, chosen uniformly, is trained with ALL of its context dropped,
    as `<bos><start_of_turn>model\\n<unused0> frames <unused1><end_of_turn>` (train.py; sample.py's uncond
    prefix): one unconditional p(audio) for every task (lucidrains drops all text; UALM keeps one audio
    segment). Keeping the input audio would guide the instruction alone and need an uncond prefix per task.
    """
    model_spans = span_is_model.nonzero().flatten()
    if torch.rand((), generator=generator).item() >= cfg_dropout or model_spans.numel() == 0:
        return 0
    return int(model_spans[torch.randint(model_spans.numel(), (), generator=generator)]) + 1


# -----------------------------------------------------------------------------
# The Transfusion Forcing loss (Eq. 12)

def chunked_cross_entropy(head: Callable, h: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Sum of CE(head(h), labels) over positions, h [N, H], made `chunk` positions at a time: each slice's logits
    are made, reduced and dropped, and made again in the backward pass (checkpoint), so [chunk, V] logits exist
    at once instead of [N, V] (a text row at paper scale: 8192 x 256 000 soft-capped logits, 25 GB)."""
    def ce(x, y):
        return F.cross_entropy(head(x).float(), y, ignore_index=-100, reduction="sum")
    return sum(checkpoint(ce, h[i: i + chunk], labels[i: i + chunk], use_reentrant=False)
               for i in range(0, max(len(labels), 1), chunk))                 # N = 0: one empty slice, loss 0


def transfusion_loss(logits: torch.Tensor, labels: torch.Tensor, v_pred: torch.Tensor,
                     v_target: torch.Tensor, weight_mask: torch.Tensor | None = None,
                     loss_weight: float = 5.0, n_text: float | torch.Tensor | None = None,
                     n_audio: float | torch.Tensor | None = None, head: Callable | None = None, chunk: int = 1024
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L = L_LM + lambda L_diffusion (Eq. 12) -> (total, lm, diffusion), float32 scalars.

    logits [N_text, V] (or, with head, hidden states [N_text, H]: chunked_cross_entropy), labels [N_text]
    (-100 = ignore) at the gathered LM positions; v_pred, v_target [N_audio, D] at the gathered frames;
    weight_mask [N_audio] marks frames with diffusion loss. L_LM = mean CE over labelled tokens; L_diffusion =
    mean over weighted frames of mean_D (v_pred - v_target)^2. n_text / n_audio replace the local counts as
    divisors: under DDP pass all_reduce(count) / world_size, so every token weighs as in one process (BAGEL).
    An empty part is exactly 0 with zero gradients, so DDP sees every parameter used.
    """
    if logits.shape[:-1] != labels.shape or v_pred.shape != v_target.shape:
        raise ValueError(f"transfusion_loss: logits {tuple(logits.shape)} must be [N, V] for labels "
                         f"{tuple(labels.shape)}, and v_pred {tuple(v_pred.shape)} must match v_target "
                         f"{tuple(v_target.shape)}; gather the LM positions and audio frames first")
    lm_sum = chunked_cross_entropy(head, logits, labels, chunk) if head else \
        F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    err = (v_pred.float() - v_target.float()).pow(2).mean(-1)              # [N_audio]
    if weight_mask is not None:
        err = err * weight_mask.to(err.dtype)
    if n_text is None:
        n_text = (labels != -100).sum()
    if n_audio is None:
        n_audio = err.numel() if weight_mask is None else weight_mask.float().sum()
    n_text, n_audio = (torch.as_tensor(n, dtype=torch.float32, device=logits.device) for n in (n_text, n_audio))
    lm = lm_sum / torch.where(n_text > 0, n_text, 1.0)         # an empty sum stays exactly 0
    diff = err.sum() / torch.where(n_audio > 0, n_audio, 1.0)
    return lm + loss_weight * diff, lm, diff


# -----------------------------------------------------------------------------
# Inference: classifier-free guidance, Karras sigmas, DPM-Solver++(2M)

def guided(v_both: VFn, w: float) -> VFn:
    """Classifier-free guidance on v, cond and uncond in one call: v_both(x_t [2B, ...], t [2B]) returns cond rows
    first. v = v_u + w (v_c - v_u), written w v_c + (1 - w) v_u so that w = 1 gives v_c exactly; x0 and eps are
    affine in v at fixed (x_t, t), so this equals CFG on x0 or on eps."""
    def v_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c, v_u = v_both(torch.cat([x_t, x_t]), torch.cat([t, t])).chunk(2)
        return w * v_c + (1 - w) * v_u
    return v_fn


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) Eq. 5: n VE sigmas from sigma_max to sigma_min, then exactly 0 -> [n + 1] float64.
    Ending at 0 makes the last step return the denoised sample; repeating sigma_min instead leaves noise in the
    output (the trap of diffusers issue #6477)."""
    if n < 1 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"get_sigmas_karras needs n >= 1 and 0 < sigma_min < sigma_max, "
                         f"got n={n}, sigma_min={sigma_min}, sigma_max={sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                    callback: Callable[[dict], None] | None = None, progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction) on the probability-flow ODE.

    x [B, ...] at sigmas[0] (sigma_max * noise); returns x at sigmas[-1], the sample if that is 0.
    In VE form the half log-SNR is lambda = -log s and the exact solution over one step of size
    h = lambda_next - lambda with D held fixed is x' = (s_next / s) x - expm1(-h) D. The first step
    uses D as is (first order); later steps extrapolate D linearly in lambda from the previous one
    with r = h_last / h (second order); the step into s = 0 returns D itself (k-diffusion's form).
    """
    sigmas = sigmas.tolist()
    ones = x.new_ones(x.shape[0])
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=not progress, desc="DPM-Solver++(2M)"):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, s * ones)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "denoised": denoised})
        if s_next == 0:
            x = denoised
            continue
        h = math.log(s) - math.log(s_next)
        d = denoised
        if old_denoised is not None:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (s_next / s) * x - math.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x


def sample(v_fn: VFn, shape: tuple[int, ...], config: DiffusionConfig,
           generator: torch.Generator | None = None, device: torch.device | str = "cpu",
           dtype: torch.dtype = torch.float32, callback: Callable[[dict], None] | None = None,
           progress: bool = False) -> torch.Tensor:
    """Draw clean latents [shape] from a v-model with config.steps Karras/DPM-Solver++(2M) steps. The noise is
    drawn on the CPU from `generator` and then moved: one seed, the same noise (and on one device the same sample)."""
    sigmas = get_sigmas_karras(config.steps, config.sigma_min, config.sigma_max, config.rho)
    x = torch.randn(shape, generator=generator, dtype=dtype).to(device) * sigmas[0].item()
    return sample_dpmpp_2m(vdenoiser(v_fn), x, sigmas, callback, progress)
