"""Every training stage of AudioChat, from the data to the three SCT stages (paper section 4.3, appendix C).

    python train.py --preset toy                       # every toy stage in order, skipping finished ones
    python train.py --preset toy --stage sct2          # one stage (it resumes from its newest checkpoint)
    python train.py --preset toy --help                # every flag, with its help and the preset's value
    torchrun --standalone --nproc_per_node=8 train.py --preset audiochat --stage sct1 --data.gemma_dir DIR

Stages (--stage; `all` runs the preset's list; each leaves its final file in --out, default checkpoints/<preset>):
  data       copilot.write_dataset into --data (toy only)                                       -> data/toy/
  tokenizer  toy: sentencepiece on the training split's text; audiochat: Gemma's                -> tokenizer.model
  vae        the stereo VAE (tokenizer.py) on random crops of every audio file under --data      -> vae.pt
  latents    every turn's audio encoded once by the frozen VAE, normalised, cached per item      -> latents/
  flam       metrics.SmallFLAM on copilot scenes with their true activity; eval AUROC/F1       -> flam.pt
  sct1       Table 5 stage 1: single-sound text-to-audio, captioning, ASR, TTS, text LM        -> sct1.pt
  sct2       stage 2: + storytelling, multi-turn editing, editing an upload, understanding     -> sct2.pt
  sct3       stage 3: the stage 2 mixture on validated turns only (no violations)              -> sct.pt
Each SCT stage starts from the previous stage's weights (stage 1 from Gemma 2 2B at paper scale, from scratch
in the toy) with a fresh AdamW: cosine decay to final_lr_fraction after a linear warm-up (lr_at, every stage).
data, tokenizer, vae and flam run in one process; latents and the SCT stages also run under torchrun
(latents sharded by item; SCT with DDP, or FSDP2 with --sct.fsdp true).

Settings. Every setting is a field of a dataclass section (data, vae_model, vae, flam_model, flam, sct_model,
sct, diffusion, sct1-3, *_loop) with a flag `--SECTION.FIELD VALUE` (tuples "a,b", mixtures "story=1,edit=2",
booleans true/false, None "none") whose help is the field's metadata; the effective configuration is printed
at start and saved in every checkpoint.

Data (section 3.1, Eqs. 1-3). Each stage samples tasks by its mixture; every document is one task laid out by
tokenizer.task_turns and encode_conversation (TaskData.build), and documents are packed into rows of
--sct.seq_len tokens with a document id per token (RoPE restarts, attention never crosses documents). Row j
of step s is a pure function of (seed, s, j) (draw_row), so any number of ranks sees the same global batch
and resuming needs only the step counter.

Checkpoints. Every stage resumes the same way: OUT/<stage>/step-NNNNNN.pt (the last --*_loop.keep_last kept,
a readable .json beside each) holds its state (Checkpoints, state_of, load_state); other settings are refused.
Final files are {"kind", "config", "model"} for tokenizer.load_model, plus: vae.pt "train_config", "step";
flam.pt "detection" (frame AUROC/F1 on the eval split), "train_config", "step"; sct1.pt, sct2.pt and sct.pt
"stage", "step", "train_config" (every section), "history" (logged losses), "evals", and "trained_with"
(tokenizer_vocab_size, tokenizer_sha256, vae_audio_dim, vae_sha256), so sample.py can refuse a mismatched set.

Test: python -m pytest -q tests/test_train.py
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import soundfile as sf
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from copilot import DatasetConfig, caption_of, conversation_path, read_conversations, scene_to_json, write_dataset
from diffusion import (DiffusionConfig, add_noise, sample_span_times, sample_uncond_span, span_loss_mask,
                       span_to_tokens, transfusion_loss)
from metrics import FLAM_PRESETS, SmallFLAM, detection_quality, flam_batch, flam_clips
from model import SCT, SCT_PRESETS
from tokenizer import (REQUESTS, SAMPLE_RATE, VAE_PRESETS, AudioError, Discriminator, Example, StereoVAE, TextTokenizer,
                       Turn, discriminator_loss, encode_conversation, load_audio, load_checkpoint,
                       load_model, load_state_dict_strict, mel_loss, stft_distance, task_turns, train_text_tokenizer,
                       vae_loss, write_atomic)


# -----------------------------------------------------------------------------
# Configuration: dataclass sections (help in each field's metadata) and presets as named data


@dataclass
class LoopConfig:
    log_every: int = field(default=50, metadata={"help": "print averaged losses every N steps"})
    eval_every: int = field(default=500, metadata={"help": "evaluate on held-out data every N steps and at the end"})
    save_every: int = field(default=200, metadata={"help": "write a resumable training checkpoint every N steps"})
    keep_last: int = field(default=3, metadata={"help": "training checkpoints kept per stage"})


@dataclass
class DataConfig:
    copilot_n: int = field(default=600, metadata={"help": "data stage: training conversations (copilot.py)"})
    copilot_eval_n: int = field(default=60, metadata={"help": "data stage: evaluation conversations"})
    copilot_seed: int = field(default=0, metadata={"help": "data stage: dataset seed (conversation i: seed, split, i)"})
    copilot_workers: int = field(default=1, metadata={"help": "data stage: processes (the data does not depend on it)"})
    vocab_size: int = field(default=2048, metadata={"help": "toy tokenizer: sentencepiece vocabulary size"})
    gemma_dir: str = field(default="", metadata={
        "help": "Hugging Face Gemma 2 directory (config.json, tokenizer.model, safetensors)"})
    speech_manifests: tuple[str, ...] = field(default=(), metadata={
        "help": "JSONL {\"audio\", \"text\", [\"start\", \"end\"]} of speech (ASR and TTS)"})
    sound_manifests: tuple[str, ...] = field(default=(), metadata={
        "help": "JSONL {\"audio\", \"text\", [\"start\", \"end\"]} of sounds (captioning, text-to-audio)"})
    text_corpora: tuple[str, ...] = field(default=(), metadata={"help": "JSONL {\"text\"} documents, text LM task"})
    heldout_every: int = field(default=100, metadata={"help": "manifests, corpora: every N-th record is held out"})
    max_clip_seconds: float = field(default=30.0, metadata={"help": "manifests: longer audio is cut to this, s"})
    context_turns: int = field(default=2, metadata={"help": "edit task: most turns per document (Eq. 3)"})


@dataclass
class VAETrainConfig:
    steps: int = field(default=400_000, metadata={"help": "optimizer steps in all (DAC: 400 k)"})
    batch_size: int = field(default=32, metadata={"help": "crops per step"})
    crop_seconds: float = field(default=0.5, metadata={"help": "length of each random crop, s (DAC 0.38 s)"})
    gain_db: float = field(default=10.0, metadata={"help": "random gain per crop, uniform in +-gain_db dB"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate, generator (DAC 1e-4)"})
    disc_lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate, discriminator"})
    betas: tuple[float, float] = field(default=(0.8, 0.99), metadata={"help": "AdamW betas (DAC, Oobleck)"})
    weight_decay: float = field(default=1e-3, metadata={"help": "AdamW weight decay (Oobleck)"})
    warmup_steps: int = field(default=1000, metadata={"help": "linear warm-up, then cosine decay to lr / 10"})
    grad_clip: float = field(default=1e3, metadata={"help": "max gradient norm (DAC clips the generator at 1e3)"})
    heldout_fraction: float = field(default=0.05, metadata={"help": "share of the files (every k-th) held out"})
    eval_seconds: float = field(default=4.0, metadata={"help": "evaluate the first seconds of <= 16 held-out files"})
    stats_crops: int = field(default=256, metadata={"help": "training crops that fit the latent normalisation"})


@dataclass
class FLAMTrainConfig:
    steps: int = field(default=20_000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "clips per step"})
    captions: int = field(default=8, metadata={
        "help": "captions per clip: its sounds, then absent ones; >= the caption pool: every caption on every clip"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate"})
    warmup_steps: int = field(default=200, metadata={"help": "linear warm-up, then cosine decay to lr / 10"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay on matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    eval_clips: int = field(default=180, metadata={"help": "held-out clips (eval split turns) for frame AUROC / F1"})


@dataclass
class SCTTrainConfig:
    seq_len: int = field(default=8192, metadata={"help": "tokens per packed row (Gemma 2's documents: 8192)"})
    batch_rows: int = field(default=64, metadata={"help": "rows per optimizer step, all ranks together (global)"})
    micro_rows: int = field(default=1, metadata={"help": "rows per forward pass per rank (gradient accumulation)"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices and embeddings"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm"})
    final_lr_fraction: float = field(default=0.1, metadata={"help": "cosine decay ends at lr * this (Table 5: none)"})
    eval_rows: int = field(default=64, metadata={"help": "held-out rows per evaluation, spread over the ranks"})
    dtype: str = field(default="bfloat16", metadata={"help": "autocast dtype on GPU; the CPU trains in float32"})
    from_gemma: bool = field(default=False, metadata={"help": "stage 1 starts from Gemma 2 2B in --data.gemma_dir"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: FSDP2 (fully_shard per block) instead of DDP"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each block in the backward pass"})
    peak_tflops: float = field(default=989.0, metadata={"help": "accelerator peak for the MFU (H100 SXM bf16: 989)"})


TASKS = ("story", "edit", "upload_edit", "understand", "t2a", "caption", "asr", "tts", "text")


@dataclass
class StageConfig:
    steps: int = field(metadata={"help": "optimizer steps (Table 5)"})
    lr: float = field(metadata={"help": "AdamW peak learning rate (Table 5)"})
    warmup_steps: int = field(metadata={"help": "linear warm-up steps, then cosine decay (Table 5)"})
    mixture: dict[str, float] = field(metadata={"help": "task -> weight; tasks: " + ", ".join(TASKS)})
    validated_only: bool = field(default=False, metadata={
        "help": "leave out copilot turns with violations and the turns after them (stage 3)"})


STAGE1 = dict(t2a=1.0, caption=1.0, asr=1.0, tts=1.0, text=1.0)
STORIES = dict(story=1.0, edit=2.0, upload_edit=1.0, understand=1.0)
TOY_MIX = dict(STAGE1, text=0.5, t2a=0.5, caption=0.5, **STORIES)   # toy stages 2 and 3

PRESET_STAGES = {
    "toy": ("data", "tokenizer", "vae", "latents", "flam", "sct1", "sct2", "sct3"),
    "audiochat": ("tokenizer", "latents", "sct1", "sct2", "sct3"),   # the VAE: `--stage vae` first, one process
}
PRESETS = {
    # Toy: about 1 h on a 2-core CPU (bench/README.md has the measured run). No separate speech corpus (asr/tts
    # weights are unused); trained from scratch, hence larger learning rates than Table 5's fine-tuning of Gemma.
    # The VAE: ~20 min at ~0.4 s/step (its 48 kHz convs dominate).
    "toy": dict(
        data=DataConfig(max_clip_seconds=8.0),
        vae=VAETrainConfig(steps=3000, batch_size=4, crop_seconds=0.4, lr=3e-3, warmup_steps=100, stats_crops=64),
        vae_loop=LoopConfig(log_every=50, eval_every=500, save_every=200),
        flam=FLAMTrainConfig(steps=1500, batch_size=8, captions=16, lr=2e-3, warmup_steps=100, eval_clips=180),
        flam_loop=LoopConfig(log_every=100, eval_every=500, save_every=250),
        sct=SCTTrainConfig(seq_len=2048, batch_rows=4, micro_rows=1, betas=(0.9, 0.98), eval_rows=8),
        sct_loop=LoopConfig(log_every=10, eval_every=100, save_every=50),
        diffusion=DiffusionConfig(),
        sct1=StageConfig(steps=60, lr=1e-3, warmup_steps=20, mixture=dict(STAGE1, text=0.5)),
        sct2=StageConfig(steps=200, lr=1e-3, warmup_steps=20, mixture=TOY_MIX),
        sct3=StageConfig(steps=40, lr=3e-4, warmup_steps=10, mixture=TOY_MIX, validated_only=True),
    ),
    # Paper scale (Table 5; batch size and sequence length are not given in the paper: 64 x 8192 tokens).
    "audiochat": dict(
        data=DataConfig(context_turns=5),
        vae=VAETrainConfig(),
        vae_loop=LoopConfig(log_every=100, eval_every=5000, save_every=2000),
        flam=FLAMTrainConfig(),
        flam_loop=LoopConfig(log_every=100, eval_every=2000, save_every=2000),
        sct=SCTTrainConfig(from_gemma=True),
        sct_loop=LoopConfig(log_every=10, eval_every=2000, save_every=1000, keep_last=2),
        diffusion=DiffusionConfig(),
        sct1=StageConfig(steps=100_000, lr=2.5e-5, warmup_steps=500, mixture=STAGE1),
        sct2=StageConfig(steps=100_000, lr=2.5e-5, warmup_steps=0, mixture=dict(STAGE1, **STORIES)),
        sct3=StageConfig(steps=20_000, lr=1.0e-4, warmup_steps=2500, mixture=dict(STAGE1, **STORIES),
                         validated_only=True),
    ),
}


def preset_sections(preset: str) -> dict:
    """Every config section of a preset, in flag order: this file's and the model presets of tokenizer/model/metrics."""
    p = PRESETS[preset]
    return {"data": p["data"], "vae_model": VAE_PRESETS[preset], "vae": p["vae"], "vae_loop": p["vae_loop"],
            "flam": p["flam"], "flam_loop": p["flam_loop"], "flam_model": FLAM_PRESETS[preset],
            "sct_model": SCT_PRESETS[preset], **{k: p[k] for k in ("sct", "sct_loop", "diffusion", *SCT_FINAL)}}


# -----------------------------------------------------------------------------
# Flags: --SECTION.FIELD for every dataclass field, typed by its annotation, its metadata as help

def field_help(cls) -> dict[str, str]:
    """Each dataclass field's help text, from field(metadata={"help": ...})."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def parse_value(text: str, hint):
    """A flag's text as the field's type: int/float/str, bool (true/false), X | None ("none"), tuples
    ("a,b,c") and dict[str, float] ("k=v,k=v")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return None if text.lower() == "none" else parse_value(text, next(a for a in args if a is not type(None)))
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if origin is tuple:
        return tuple(parse_value(x.strip(), args[0]) for x in text.split(",") if x.strip())
    if origin is dict:
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"expected key=value pairs separated by commas, got {text!r}")
        return {k.strip(): parse_value(v.strip(), args[1]) for k, v in pairs}
    return hint(text)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """The run flags and the effective config sections (the preset's, with --section.field overrides)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="toy")
    sections = preset_sections(pre.parse_known_args(argv)[0].preset)      # --help shows this preset's values
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [--preset P] [--stage S] [run flags] [--SECTION.FIELD V ...]")
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default="toy", help="model and schedule scale")
    run.add_argument("--stage", choices=("all",) + PRESET_STAGES["toy"], default="all",
                     help="the stage to run; `all` runs the preset's stages in order, skipping finished ones")
    run.add_argument("--data", type=Path, default=None, help="copilot dataset folder (default data/<preset>)")
    run.add_argument("--out", type=Path, default=None, help="checkpoint folder (default checkpoints/<preset>)")
    run.add_argument("--seed", type=int, default=0, help="seed of weights, data order, CFG dropout and noise")
    run.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda:LOCAL_RANK when available)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: half the "
                     "cores per process, at least 1: idle OpenMP threads spinning on a loaded machine cost up to 20x)")
    run.add_argument("--stop-after", type=int, default=None, metavar="K", help="stop hard after step K of a stage, "
                     "without a final save (to test resuming)")
    for name, cfg in sections.items():
        group = parser.add_argument_group(f"{name} ({type(cfg).__name__})")
        hints, helps = typing.get_type_hints(type(cfg)), field_help(type(cfg))
        for f in fields(cfg):
            def convert(text, hint=hints[f.name]):
                return parse_value(text, hint)
            convert.__name__ = getattr(hints[f.name], "__name__", str(hints[f.name]))    # argparse's error names it
            v = getattr(cfg, f.name)
            shown = ",".join(map(str, v)) if isinstance(v, tuple) else \
                ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else v
            group.add_argument(f"--{name}.{f.name}", dest=f"{name}.{f.name}", type=convert, default=argparse.SUPPRESS,
                               metavar="V", help=f"{helps[f.name]} [{shown}]".replace("%", "%%"))
    args = parser.parse_args(argv)
    args.data = args.data or Path("data") / args.preset
    args.out = args.out or Path("checkpoints") / args.preset
    given = vars(args)                                    # flags not given are absent (SUPPRESS): the preset's value
    return args, {name: replace(cfg, **{f.name: given[f"{name}.{f.name}"] for f in fields(cfg)
                                        if f"{name}.{f.name}" in given}) for name, cfg in sections.items()}


# -----------------------------------------------------------------------------
# Checkpoints, optimizer and the learning-rate schedule: one resume path for every stage

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)   # whole tensors on the CPU, gathered from shards


def save_checkpoint(path: str | os.PathLike, obj: dict) -> None:
    """torch.save through tokenizer.write_atomic: a crash never leaves half a checkpoint."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Checkpoints:
    """The resumable training checkpoints of one stage: folder/step-NNNNNN.pt with a readable .json beside
    each, the newest keep_last kept. Both record the run's settings, and resuming with other settings is
    refused: they would change the result."""

    def __init__(self, folder: Path, keep_last: int, settings: dict):
        self.folder, self.keep_last, self.settings = Path(folder), keep_last, settings
        self.path = None                                  # the checkpoint resumed from

    def save(self, step: int, state: dict, meta: dict) -> None:
        path = self.folder / f"step-{step:06d}.pt"
        save_checkpoint(path, {**state, "step": step, "settings": self.settings})
        text = json.dumps({"step": step, **meta, "settings": self.settings}, indent=1, default=str)
        write_atomic(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))
        for old in sorted(self.folder.glob("step-*.pt"))[: -self.keep_last]:
            old.unlink()
            old.with_suffix(".json").unlink(missing_ok=True)

    def resume(self) -> dict | None:
        """The newest checkpoint (read by tokenizer.load_checkpoint), or None; an error when it has other settings."""
        paths = sorted(self.folder.glob("step-*.pt"))
        if not paths:
            return None
        self.path = paths[-1]
        ckpt = load_checkpoint(self.path)
        diff = []
        for k, now in self.settings.items():
            old = ckpt["settings"].get(k)
            if isinstance(now, dict) and isinstance(old, dict):
                diff += [f"{k}.{f} {old.get(f)!r} -> {now.get(f)!r}" for f in now | old if old.get(f) != now.get(f)]
            elif old != now:
                diff.append(f"{k} {old!r} -> {now!r}")
        if diff:
            raise ValueError(f"{self.folder} was trained with other settings: {'; '.join(diff)}; resume with the same "
                             f"flags or delete {self.folder}")
        return ckpt


def state_of(objects: dict) -> dict:
    """What a training checkpoint holds to resume exactly: the torch RNG and each named object's state. Modules
    and (module, optimizer) pairs give full state dicts, gathered from FSDP2 shards (a collective: every rank
    calls this); schedulers give state_dict(), generators get_state()."""
    state = {"rng": torch.get_rng_state()}
    for name, obj in objects.items():
        if isinstance(obj, tuple):
            state[name] = get_optimizer_state_dict(*obj, options=FULL)
        elif isinstance(obj, torch.nn.Module):
            state[name] = get_model_state_dict(obj, options=FULL)
        else:
            state[name] = obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()
    return state


def load_state(ckpt: dict, path: Path, objects: dict) -> None:
    """Restore what state_of saved into the named objects (load modules before DDP/FSDP wrap them: strictly,
    by tokenizer.load_state_dict_strict) and the torch RNG."""
    torch.set_rng_state(ckpt["rng"])
    for name, obj in objects.items():
        if isinstance(obj, tuple):
            set_optimizer_state_dict(*obj, ckpt[name], options=FULL)
        elif isinstance(obj, torch.nn.Module):
            load_state_dict_strict(obj, ckpt[name], path)
        else:
            obj.set_state(ckpt[name]) if isinstance(obj, torch.Generator) else obj.load_state_dict(ckpt[name])


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, **kw) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on norms, biases or scales)."""
    params = list(model.parameters())
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr, **kw)


def lr_at(step: int, peak: float, steps: int, warmup: int, final_fraction: float) -> float:
    """The learning rate of every stage: linear warm-up to `peak` over `warmup` steps, then cosine decay to
    peak * final_fraction at `steps` (peak 1 gives LambdaLR's multiplier)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# Distributed: torchrun env -> process group -> DDP or FSDP2 -> no_sync on non-final micro-steps

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> Dist:
    """Under torchrun (RANK set) join the process group: nccl on GPU, gloo on CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if "RANK" not in os.environ:
        return Dist(device=dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap_model(core: torch.nn.Module, d: Dist, fsdp: bool) -> torch.nn.Module:
    """DDP, or FSDP2: fully_shard every transformer block, then the root (parameters become DTensor shards)."""
    if d.world == 1:
        return core
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(d.device.type, (d.world,))
        for block in core.sct.model.layers:
            fully_shard(block, mesh=mesh)
        return fully_shard(core, mesh=mesh)
    return DDP(core, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def grad_sync(model: torch.nn.Module, on: bool):
    """Gradient accumulation: skip the all-reduce (DDP no_sync) or reduce-scatter (FSDP2) on non-final micro-steps."""
    if isinstance(model, DDP) and not on:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(on)
    return contextlib.nullcontext()


def single_process_stage(name: str, d: Dist, out: Path) -> None:
    if d.world > 1:
        raise RuntimeError(f"stage {name} runs in one process: run `python train.py --stage {name} --out {out}` "
                           f"first, then torchrun the later stages")


# -----------------------------------------------------------------------------
# Stages: data (toy) and tokenizer

def run_data(cfg: DataConfig, data: Path, d: Dist) -> None:
    """copilot.write_dataset(data, n, eval_n), skipped when every conversation file is there."""
    splits = (("train", cfg.copilot_n), ("eval", cfg.copilot_eval_n))
    if all(conversation_path(data, s, i, DatasetConfig().shard_size).exists() for s, n in splits for i in range(n)):
        print(f"data: {data} holds {cfg.copilot_n} + {cfg.copilot_eval_n} conversations; skipping")
        return
    single_process_stage("data", d, data)
    stats = write_dataset(data, cfg.copilot_n, cfg.copilot_eval_n, DatasetConfig(seed=cfg.copilot_seed),
                          cfg.copilot_workers)
    print(f"data: {json.dumps(stats)}")


def run_tokenizer(cfg: DataConfig, data: Path, out: Path, preset: str) -> Path:
    """toy: train a sentencepiece model on the training split's text; audiochat: copy Gemma's tokenizer.model."""
    path = out / "tokenizer.model"
    if path.exists():
        print(f"tokenizer: {path} exists; skipping")
        return path
    if preset != "toy":
        write_atomic(path, lambda tmp: shutil.copyfile(gemma_dir(cfg) / "tokenizer.model", tmp))
        return path
    texts = [w for ws in REQUESTS.values() for w in ws] + ["user\n", "model\n"]
    for conv in read_conversations(data, "train"):
        texts.append(conv.seed_text)
        for turn in conv.turns:
            texts += [turn.instruction, scene_to_json(turn.scene), scene_to_json(caption_of(turn.scene))]
    tok = train_text_tokenizer(texts, path, cfg.vocab_size)
    print(f"tokenizer: {tok.vocab_size} pieces from {len(texts)} texts -> {path}")
    return path


def gemma_dir(cfg: DataConfig) -> Path:
    """The Hugging Face Gemma 2 directory, checked: a clear error when it is missing or incomplete."""
    d = Path(cfg.gemma_dir) if cfg.gemma_dir else None
    missing = ["--data.gemma_dir"] if d is None else \
        [name for name in ("config.json", "tokenizer.model") if not (d / name).is_file()]
    if missing:
        raise FileNotFoundError(f"Gemma 2 directory {d}: missing {missing}; download the pre-trained (not "
                                f"instruction-tuned) model once, e.g. `huggingface-cli download google/gemma-2-2b "
                                f"--local-dir DIR`, and pass --data.gemma_dir DIR")
    return d


# -----------------------------------------------------------------------------
# Stage: VAE, on random crops of every audio file under a folder

def find_audio(root: str | os.PathLike) -> list[tuple[Path, int, int]]:
    """(path, frames, sample rate) of every .wav/.flac under root, sorted; a clear error if there is none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder; make audio with `python copilot.py --out {root}`")
    files = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in (".wav", ".flac")):
        info = sf.info(str(path))
        if info.channels > 2 or info.frames == 0:
            raise AudioError(f"{path}: {info.channels} channels, {info.frames} frames; training needs non-empty "
                             f"mono or stereo files, remove or convert it")
        files.append((path, info.frames, info.samplerate))
    if not files:
        raise FileNotFoundError(f"--data {root}: no .wav or .flac files under it")
    return files


def read_crop(file: tuple[Path, int, int], num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """A random crop [2, num_samples] at 48 kHz (zero-padded when the file is shorter); mono duplicated."""
    path, frames, sr = file
    if sr != SAMPLE_RATE:                                    # rare: resample the whole file, then crop
        audio = load_audio(path)
    else:
        start = int(torch.randint(max(1, frames - num_samples + 1), (1,), generator=generator))
        data, _ = sf.read(str(path), frames=num_samples, start=start, dtype="float32", always_2d=True)
        audio = torch.from_numpy(data.T.copy()).expand(2, -1)
    if audio.shape[1] > num_samples:
        start = int(torch.randint(audio.shape[1] - num_samples + 1, (1,), generator=generator))
        audio = audio[:, start: start + num_samples]
    return torch.nn.functional.pad(audio, (0, num_samples - audio.shape[1]))


def crop_batch(files: list, batch_size: int, num_samples: int, generator: torch.Generator,
               gain_db: float = 0.0) -> torch.Tensor:
    """[batch_size, 2, num_samples] random crops from random files, each scaled by a random gain uniform
    in +-gain_db dB (the VAE must keep levels, hence the stereo image, at every level) and with left and
    right swapped half of the time (every stereo image is seen mirrored as often as not)."""
    idx = torch.randint(len(files), (batch_size,), generator=generator).tolist()
    batch = torch.stack([read_crop(files[i], num_samples, generator) for i in idx])
    gain = 10 ** ((torch.rand(batch_size, 1, 1, generator=generator) * 2 - 1) * gain_db / 20)
    swap = torch.rand(batch_size, generator=generator) < 0.5
    batch[swap] = batch[swap].flip(1)
    return batch * gain


@torch.no_grad()
def evaluate_vae(vae: StereoVAE, clips: list[torch.Tensor]) -> dict[str, float]:
    """Inference-path reconstruction (encode -> decode, posterior mean) of held-out clips [2, S]: mean
    multi-resolution STFT distance on L/R and multi-scale mel distance."""
    c, stft, mel = vae.config, 0.0, 0.0
    for audio in clips:
        recon = vae.decode(vae.encode(audio[None]), audio.shape[-1])
        stft += stft_distance(recon, audio[None], c.stft_ffts).item()
        mel += mel_loss(recon, audio[None], c.mel_windows, c.mel_bins).item()
    return {"stft": stft / len(clips), "mel": mel / len(clips)}


def train_vae(cfg, tc: VAETrainConfig, loop: LoopConfig, data: Path, out: Path, seed: int,
              stop_after: int | None = None) -> Path:
    """The VAE stage (cfg: tokenizer.VAEConfig); returns the path of vae.pt."""
    final = Path(out) / "vae.pt"
    if final.exists():
        print(f"vae: {final} exists; skipping")
        return final
    files = find_audio(data)
    k = max(2, round(1 / tc.heldout_fraction))
    heldout = files[k - 1::k] if len(files) >= 2 else []
    train = [f for f in files if f not in heldout]
    clips = [load_audio(f[0])[:, : int(tc.eval_seconds * SAMPLE_RATE)] for f in heldout[:16]]
    print(f"vae: {len(train)} training files, {len(heldout)} held out, under {data}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)                      # data order and crops
    vae = StereoVAE(cfg)
    disc = Discriminator(cfg) if cfg.gan else None
    opt = torch.optim.AdamW(vae.parameters(), tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    opt_d = None if disc is None else torch.optim.AdamW(disc.parameters(), tc.disc_lr, betas=tc.betas,
                                                         weight_decay=tc.weight_decay)
    objects = {"model": vae, "optimizer": (vae, opt), "data": gen} | (
        {"disc": disc, "disc_optimizer": (disc, opt_d)} if disc else {})
    settings = {"vae_model": asdict(cfg), "vae": asdict(tc), "seed": seed}
    ckpts, step = Checkpoints(Path(out) / "vae", loop.keep_last, settings), 0
    if ckpt := ckpts.resume():
        load_state(ckpt, ckpts.path, objects)
        step = ckpt["step"]
        print(f"vae: resuming from step {step} ({ckpts.path})")
    num_samples = int(tc.crop_seconds * SAMPLE_RATE)
    sums, n, t0 = {}, 0, time.perf_counter()                       # loss sums over the n steps since the last log
    vae.train()
    for step in tqdm(range(step, tc.steps), initial=step, total=tc.steps, desc="vae", dynamic_ncols=True):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc.lr, tc.steps, tc.warmup_steps, 0.1)
        audio = crop_batch(train, tc.batch_size, num_samples, gen, tc.gain_db)
        loss, parts, recon = vae_loss(vae, audio, disc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), tc.grad_clip)
        opt.step()
        if disc:                                                   # LSGAN discriminator step on the same pair
            d_loss = discriminator_loss(disc, audio, recon)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            parts["disc"] = d_loss.item()
        sums, n, done = {k: sums.get(k, 0.0) + v for k, v in {"loss": loss.item(), **parts}.items()}, n + 1, step + 1
        if done % loop.log_every == 0 or done == tc.steps:
            tqdm.write(f"vae step {done:6d} | " + " ".join(f"{k} {v / n:.4f}" for k, v in sums.items()) +
                       f" | lr {opt.param_groups[0]['lr']:.2e} | {1000 * (time.perf_counter() - t0) / n:.0f} ms/step")
            sums, n, t0 = {}, 0, time.perf_counter()
        if clips and (done % loop.eval_every == 0 or done == tc.steps):
            vae.eval()
            tqdm.write(f"vae eval {done:6d} | held-out " +
                       " ".join(f"{k} {v:.4f}" for k, v in evaluate_vae(vae, clips).items()))
            vae.train()
            t0 = time.perf_counter()                               # ms/step counts training only
        if done % loop.save_every == 0 and done < tc.steps:
            ckpts.save(done, state_of(objects), {"loss": loss.item()})
        if stop_after is not None and done >= stop_after:
            raise SystemExit(f"vae: stopped after step {done} (--stop-after)")
    vae.eval()
    stats_gen = torch.Generator().manual_seed(seed + 1)
    vae.fit_latent_stats(crop_batch(train, 8, num_samples, stats_gen) for _ in range(math.ceil(tc.stats_crops / 8)))
    print(f"vae: latent normalisation fitted, |shift| mean {vae.latent_shift.abs().mean():.3f}, "
          f"scale mean {vae.latent_scale.mean():.3f}")
    save_checkpoint(final, {"kind": "vae", "config": asdict(cfg), "model": vae.state_dict(), "train_config": asdict(tc),
                            "step": tc.steps})
    print(f"vae: saved {final}")
    return final


# -----------------------------------------------------------------------------
# Paper-scale readers (documented JSONL formats) and the latent cache

@dataclass
class Record:
    """One audio-text pair of a manifest (or a text document of a corpus: audio None)."""
    key: str                      # latent cache key (relative path under latents/, no suffix)
    text: str                     # transcript, caption, or the document
    audio: Path | None = None     # 48 kHz-or-any-rate audio file soundfile reads
    start: float = 0.0            # s, where the clip starts in the file
    end: float | None = None      # s, where it ends (None: the file's end, at most max_clip_seconds later)


def read_jsonl(path: Path, keys: tuple[str, ...], split: str, heldout_every: int) -> list[tuple[int, dict]]:
    """(index, record) of one split of a JSONL file's records (blank lines skipped): every heldout_every-th is
    "eval", the rest "train". Each must be an object with non-empty strings at `keys`: an error names the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file; check the --data.* flag that names it")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not JSON ({e.msg}); each line must be one object with keys "
                             f"{list(keys)}") from e
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) or not row[k].strip() for k in keys):
            raise ValueError(f"{path}, line {n}: needs non-empty string values for {list(keys)}, got {line[:120]!r}")
        rows.append(row)
    return [(i, row) for i, row in enumerate(rows) if (i % heldout_every == heldout_every - 1) == (split == "eval")]


def read_manifest(path: Path, split: str, heldout_every: int) -> list[Record]:
    """Audio-text manifest: one {"audio": path (relative to the manifest's folder), "text": str, ["start": s,
    "end": s]} per line."""
    path = Path(path)
    tag = f"{path.stem}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    return [Record(f"{tag}/{i // 1000:05d}/{i:08d}", row["text"], path.parent / row["audio"],
                   float(row.get("start", 0.0)), None if row.get("end") is None else float(row["end"]))
            for i, row in read_jsonl(path, ("audio", "text"), split, heldout_every)]


@torch.no_grad()
def run_latents(cfg: DataConfig, data: Path, out: Path, d: Dist) -> Path:
    """Encode every item's audio once with the frozen VAE (normalised posterior mean, float16): one file per story
    (its turns, whole) or manifest clip (cut at max_clip_seconds) under out/latents, both splits, written
    atomically; items are sharded over ranks and finished ones skipped."""
    folder, vae_path = out / "latents", out / "vae.pt"
    vae = load_model(StereoVAE, vae_path, d.device)
    stamp, digest = folder / "vae.sha256", file_sha256(vae_path)
    if stamp.exists() and stamp.read_text() != digest:
        raise ValueError(f"{folder} was encoded with another vae.pt; delete {folder} to encode again")
    if d.main:
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest)
    items = []                           # (cache key, audio files, (start, end or None) s per file)
    for split in ("train", "eval"):
        if (data / split).is_dir():
            items += [(f"stories/{split}/{c.id}", [t.audio for t in c.turns], [(0.0, None)] * len(c.turns))
                      for c in read_conversations(data, split)]
        for m in cfg.speech_manifests + cfg.sound_manifests:
            items += [(r.key, [r.audio], [(r.start, min(r.end or math.inf, r.start + cfg.max_clip_seconds))])
                      for r in read_manifest(m, split, cfg.heldout_every)]
    todo = [it for i, it in enumerate(items) if i % d.world == d.rank and not (folder / f"{it[0]}.pt").exists()]
    print(f"latents: {len(items)} items, {len(todo)} to encode on rank {d.rank}")
    for key, paths, spans in tqdm(todo, desc="latents", disable=not d.main, dynamic_ncols=True):
        latents = []
        for path, (start, end) in zip(paths, spans):
            audio = load_audio(path)[:, int(start * SAMPLE_RATE): None if end is None else int(end * SAMPLE_RATE)]
            latents.append(vae.encode(audio[None].to(d.device))[0].to("cpu", torch.float16))
        save_checkpoint(folder / f"{key}.pt", {"latents": latents})
    barrier()
    return folder


# -----------------------------------------------------------------------------
# Stage: the small FLAM (metrics.py) on copilot scenes with their true activity

def train_flam(mc, tc: FLAMTrainConfig, loop: LoopConfig, data: Path, out: Path, seed: int,
               stop_after: int | None = None) -> Path:
    """Train metrics.SmallFLAM (mc: FLAMConfig); report frame AUROC/F1 on the eval split; write flam.pt."""
    final = out / "flam.pt"
    if final.exists():
        print(f"flam: {final} exists; skipping")
        return final
    clips, held = flam_clips(read_conversations(data, "train")), flam_clips(read_conversations(data, "eval"))
    held, pool = held[: tc.eval_clips], sorted({c for clip in clips for c in clip.events})
    print(f"flam: {len(clips)} training clips, {len(pool)} captions, {len(held)} held-out clips")
    torch.manual_seed(seed)
    model = SmallFLAM(mc)
    opt = adamw(model, tc.lr, tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, tc.steps, tc.warmup_steps, 0.1))
    objects = {"model": model, "optimizer": (model, opt), "scheduler": sched}
    settings = {"flam_model": asdict(mc), "flam": asdict(tc), "seed": seed}
    ckpts, step, quality = Checkpoints(out / "flam", loop.keep_last, settings), 0, {}
    if ckpt := ckpts.resume():
        load_state(ckpt, ckpts.path, objects)
        step = ckpt["step"]
        print(f"flam: resuming from step {step} ({ckpts.path})")
    loss_sum, n, t0 = 0.0, 0, time.perf_counter()
    for step in tqdm(range(step, tc.steps), initial=step, total=tc.steps, desc="flam", dynamic_ncols=True):
        rng = random.Random(f"{seed}|flam|{step}")                 # stateless: resume needs only the step
        audio, captions, targets = flam_batch(rng.sample(clips, min(tc.batch_size, len(clips))), pool, tc.captions,
                                              rng, mc.hop_samples)
        loss = model.loss(audio, captions, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        loss_sum, n, done = loss_sum + loss.item(), n + 1, step + 1
        if done % loop.log_every == 0 or done == tc.steps:
            tqdm.write(f"flam step {done:6d} | loss {loss_sum / n:.4f} | lr {sched.get_last_lr()[0]:.2e} | "
                       f"{1000 * (time.perf_counter() - t0) / n:.0f} ms/step")
            loss_sum, n, t0 = 0.0, 0, time.perf_counter()
        if held and (done % loop.eval_every == 0 or done == tc.steps):
            model.eval()
            quality = detection_quality(model.score, held)
            model.train()
            tqdm.write(f"flam eval {done:6d} | held-out frame detection " +
                       " ".join(f"{k} {v:.3f}" for k, v in quality.items()))
            t0 = time.perf_counter()
        if done % loop.save_every == 0 and done < tc.steps:
            ckpts.save(done, state_of(objects), {"loss": loss.item()})
        if stop_after is not None and done >= stop_after:
            raise SystemExit(f"flam: stopped after step {done} (--stop-after)")
    save_checkpoint(final, {"kind": "flam", "config": asdict(mc), "model": model.state_dict(), "detection": quality,
                            "step": tc.steps, "train_config": settings})
    print(f"flam: saved {final}")
    return final


# -----------------------------------------------------------------------------
# SCT data: documents per task, Diffusion Forcing noise, CFG dropout, packing

class TaskData:
    """Every document source of one split (copilot stories, manifests, corpora), indexed per task: pools[task]
    lists items ("conv", conversation index, turn k) or ("record", Record, 0) in a fixed order."""

    def __init__(self, cfg: DataConfig, stories: Path, latents: Path, split: str, tok: TextTokenizer,
                 audio_dim: int, validated_only: bool = False):
        self.cfg, self.latents_dir, self.split, self.tok, self.audio_dim = cfg, latents, split, tok, audio_dim
        self.convs = read_conversations(stories, split) if (stories / split).is_dir() else []
        self.pools = {task: [] for task in TASKS}
        for i, conv in enumerate(self.convs):
            valid = len(conv.turns)                                # turns before the first violation
            if validated_only:
                valid = next((k for k, t in enumerate(conv.turns) if t.violations), valid)
            first = range(min(valid, 1))
            turns = dict(text=[0], t2a=first, caption=first) if conv.turns[0].kind == "t2a" else \
                dict(text=[0], story=first, understand=range(valid), edit=range(1, valid), upload_edit=range(1, valid))
            for task, ks in turns.items():
                self.pools[task] += [("conv", i, k) for k in ks]
        speech = [r for m in cfg.speech_manifests for r in read_manifest(m, split, cfg.heldout_every)]
        sounds = [r for m in cfg.sound_manifests for r in read_manifest(m, split, cfg.heldout_every)]
        corpus = [Record("", row["text"]) for c in cfg.text_corpora                 # {"text": document}
                  for _, row in read_jsonl(c, ("text",), split, cfg.heldout_every)]
        for task, records in (("asr", speech), ("tts", speech), ("t2a", sounds), ("caption", sounds), ("text", corpus)):
            self.pools[task] += [("record", r, 0) for r in records]

    def mixture(self, weights: dict[str, float], strict: bool) -> tuple[list[str], list[float]]:
        """The tasks with positive weight and data (strict: at least one, or an error) and their weights."""
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown} in a stage mixture; known: {', '.join(TASKS)}")
        tasks = [t for t, w in weights.items() if w > 0 and self.pools[t]]
        if strict and not tasks:
            raise ValueError(f"no {self.split} data for any task of the mixture {weights}; check --data and --data.*")
        return tasks, [weights[t] for t in tasks]

    def latents(self, key: str) -> list[torch.Tensor]:
        path = self.latents_dir / f"{key}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no cached latents; run `python train.py --stage latents`")
        return [z.float() for z in torch.load(path, weights_only=True)["latents"]]

    def document(self, task: str, rng: random.Random) -> list[Turn] | list[int]:
        """A random document of `task`: chat turns, or token ids for the text LM task."""
        return self.build(task, rng.choice(self.pools[task]), rng)

    def build(self, task: str, item: tuple, rng: random.Random) -> list[Turn] | list[int]:
        """The document of `task` for one pool item, laid out by tokenizer.task_turns (request wordings drawn from
        rng). The edit task is a conversation window of at most context_turns turns ending at turn k: each a story
        after the turns before it (Eq. 3); a window that starts after turn 0 opens as an upload edit of the audio
        before it (Eq. 2), so the scene being edited is always in context. text: token ids (draw_row adds <bos>
        ... <eos>, LM loss on every token)."""
        kind, ref, k = item
        if kind == "record":
            if task == "text":
                return self.tok.encode(ref.text)
            z = self.latents(ref.key)[0]
            if task in ("asr", "caption"):
                return task_turns(task, clip=z, request=rng.choice(REQUESTS[task]), answer=ref.text)
            instruction = ref.text if task == "t2a" else rng.choice(REQUESTS["tts"]).format(ref.text)
            return task_turns(task, instruction=instruction, audio=z)
        conv = self.convs[ref]
        if task == "text":
            return self.tok.encode("\n".join([conv.seed_text] + [t.instruction for t in conv.turns]))
        z, turns = self.latents(f"stories/{self.split}/{conv.id}"), conv.turns
        plan = [scene_to_json(t.scene) for t in turns]
        caption = [scene_to_json(caption_of(t.scene)) for t in turns]
        if task == "t2a":
            return task_turns("t2a", instruction=turns[0].instruction, audio=z[0])
        if task == "caption":
            request = rng.choice(REQUESTS["caption"])
            return task_turns("caption", clip=z[0], request=request, answer=turns[0].scene.sounds[0].text)
        if task == "understand":
            return task_turns("understand", clip=z[k], request=rng.choice(REQUESTS["understand"]), caption=caption[k])
        if task == "story":
            return task_turns("story", instruction=turns[0].instruction, plan=plan[0], audio=z[0])
        first = k if task == "upload_edit" else max(0, k - self.cfg.context_turns + 1)
        doc = []
        if first > 0:
            doc += task_turns("upload_edit", clip=z[first - 1], instruction=turns[first].instruction,
                              caption=caption[first - 1], plan=plan[first], audio=z[first])
        for j in range(first + (first > 0), k + 1):
            doc += task_turns("story", instruction=turns[j].instruction, plan=plan[j], audio=z[j])
        return doc


def key_seed(*parts) -> int:
    """A 63-bit seed from any values (stateless randomness keyed by seed, step, row, document)."""
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


def text_example(ids: list[int], tok: TextTokenizer, audio_dim: int) -> Example:
    """<bos> text <eos> with the LM loss on every token (the text-only task)."""
    t = torch.tensor([tok.bos_id] + ids + [tok.eos_id])
    z = torch.zeros(len(t), dtype=torch.long)
    return Example(ids=t, labels=torch.cat([t[1:], torch.tensor([-100])]), audio_mask=z.bool(), span_ids=z,
                   span_is_model=torch.zeros(0, dtype=torch.bool), latents=torch.zeros(0, audio_dim))


def noise_document(ex: Example, gen: torch.Generator, dc: DiffusionConfig, cfg_dropout: float,
                   tok: TextTokenizer) -> dict[str, torch.Tensor]:
    """CFG dropout, one diffusion time per span (Diffusion Forcing) and the noised latents of one document:
    1-D tensors of its length T (x, v: [T, audio_dim], zero at text positions)."""
    k = sample_uncond_span(ex.span_is_model, gen, cfg_dropout)
    if k:                                                          # the unconditional document of span k
        frames = ex.latents[ex.span_ids[ex.audio_mask] == k]
        ex = encode_conversation([Turn("model", [frames])], tok)
    t = sample_span_times(ex.span_is_model, gen, dc.clean_context_prob)       # [N]
    t_tok = span_to_tokens(t, ex.span_ids)                                    # [T], 0 at text
    loss_tok = span_to_tokens(span_loss_mask(t, ex.span_is_model), ex.span_ids)
    x_t, v = add_noise(ex.latents, t_tok[ex.audio_mask], torch.randn(ex.latents.shape, generator=gen))
    x, v_full = (torch.zeros(len(ex.ids), ex.latents.shape[1]) for _ in range(2))
    x[ex.audio_mask], v_full[ex.audio_mask] = x_t, v
    return dict(ids=ex.ids, labels=ex.labels, audio_mask=ex.audio_mask, span_ids=ex.span_ids, t=t_tok,
                audio=x, v=v_full, loss_mask=loss_tok)


def draw_row(data: TaskData, mixture: tuple[list[str], list[float]], seq_len: int, dc: DiffusionConfig,
             cfg_dropout: float, *key) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """One packed row of seq_len tokens, a pure function of `key` (seed, step, row): documents drawn with
    random.Random("seed|step|row") until one no longer fits (three times), each with its own doc id (positions
    restart, no attention across documents) and its CFG dropout, diffusion times and noise drawn from a generator
    keyed by (seed, step, row, document); the rest is padding (a document of its own). A document longer than a
    row is dropped and counted. CFG dropout replaces a document by the unconditional
    `<bos><start_of_turn>model\\n<unused0> frames <unused1><end_of_turn>\\n` (diffusion.sample_uncond_span)."""
    rng, docs, used, misses, stats = random.Random("|".join(map(str, key))), [], 0, 0, {"dropped": 0, "docs": 0}
    while misses < 3:
        task = rng.choices(*mixture)[0]
        doc = data.document(task, rng)
        if task == "text":                                        # long texts: a random window of a row
            start = rng.randrange(max(1, len(doc) - seq_len + 3))
            ex = text_example(doc[start: start + seq_len - 2], data.tok, data.audio_dim)
        else:
            ex = encode_conversation(doc, data.tok, audio_dim=data.audio_dim)
        stats["dropped"] += len(ex.ids) > seq_len
        if used + len(ex.ids) > seq_len:
            misses += 1
            continue
        docs.append(noise_document(ex, torch.Generator().manual_seed(key_seed(*key, len(docs))), dc, cfg_dropout,
                                   data.tok))
        used += len(docs[-1]["ids"])                               # CFG dropout may have shortened it
    pad, D = seq_len - used, data.audio_dim
    tail = dict(ids=torch.full((pad,), data.tok.pad_id), labels=torch.full((pad,), -100),
                audio_mask=torch.zeros(pad, dtype=torch.bool), span_ids=torch.zeros(pad, dtype=torch.long),
                t=torch.zeros(pad), audio=torch.zeros(pad, D), v=torch.zeros(pad, D),
                loss_mask=torch.zeros(pad, dtype=torch.bool))
    row = {name: torch.cat([doc[name] for doc in docs] + [tail[name]]) for name in tail}
    row["doc_ids"] = torch.cat([torch.full((len(doc["ids"]),), i) for i, doc in enumerate(docs)] +
                               [torch.full((pad,), len(docs))])
    stats.update(docs=len(docs), tokens=used)
    return row, stats


class TransfusionForcing(torch.nn.Module):
    """The SCT and the Transfusion Forcing loss (Eq. 12) in one forward, so DDP/FSDP wrap a single module."""

    def __init__(self, sct: SCT, loss_weight: float):
        super().__init__()
        self.sct, self.loss_weight = sct, loss_weight

    def forward(self, b: dict[str, torch.Tensor], n_text, n_audio):
        h_text, h_audio = self.sct(b["ids"], b["audio"], b["audio_mask"], b["t"], b["span_ids"], b["doc_ids"])
        lm = b["labels"] != -100                                    # gather LM positions before the vocab matmul
        logits = self.sct.lm_logits(h_text[lm])                     # [N_text, V]
        v_pred = self.sct.velocity(h_audio[b["loss_mask"]])        # [N_audio, audio_dim]
        return transfusion_loss(logits, b["labels"][lm], v_pred, b["v"][b["loss_mask"]], None, self.loss_weight,
                                n_text, n_audio)


# -----------------------------------------------------------------------------
# Stages: SCT 1-3 (paper section 4.3, Table 5)

SCT_FINAL = {"sct1": "sct1.pt", "sct2": "sct2.pt", "sct3": "sct.pt"}


def build_sct(stage: str, cfg: dict, out: Path, trained_with: dict) -> SCT:
    """The stage's starting SCT: the previous stage's weights, else Gemma 2 (paper scale) or a fresh init."""
    mc = replace(cfg["sct_model"], vocab_size=trained_with["tokenizer_vocab_size"],
                 audio_dim=trained_with["vae_audio_dim"])
    previous = {"sct2": "sct1", "sct3": "sct2"}.get(stage)
    if previous:
        path = out / SCT_FINAL[previous]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: stage {stage} starts from stage {previous}; run --stage {previous} first")
        ckpt = load_checkpoint(path, "sct")
        if ckpt.get("trained_with") != trained_with:
            raise ValueError(f"{path} was trained with another tokenizer or VAE ({ckpt.get('trained_with')}, now "
                             f"{trained_with}); retrain {previous} or restore its tokenizer.model and vae.pt")
        return load_model(SCT, path, ckpt=ckpt).train()
    if not cfg["sct"].from_gemma:
        return SCT(mc)
    sct = SCT.from_gemma(gemma_dir(cfg["data"]), mc.num_generation_layers, mc.audio_dim,    # paper B.2
                         attn_implementation=mc.attn_implementation)
    if sct.config.vocab_size != mc.vocab_size:
        raise ValueError(f"Gemma 2 in {cfg['data'].gemma_dir} has a vocabulary of {sct.config.vocab_size}, but "
                         f"tokenizer.model has {mc.vocab_size} pieces; run --stage tokenizer with this gemma_dir")
    return sct


def run_rows(model: torch.nn.Module, forward, rows: list, d: Dist, tc: SCTTrainConfig, train: bool) -> dict:
    """Forward (and backward) over this rank's rows in micro-batches of micro_rows, every token's loss weighted as
    in one process with the global batch: the global token counts are all-reduced first and divided by the world
    size, as DDP/FSDP average gradients over ranks -> global mean lm and diff losses, tokens, dropped documents."""
    counts = torch.tensor([[(r["labels"] != -100).sum(), r["loss_mask"].sum(), s["tokens"], s["dropped"]]
                           for r, s in rows] or [[0] * 4], dtype=torch.float64).sum(0)
    n_text, n_audio, tokens, dropped = all_sum(counts.to(d.device)).tolist()
    parts = torch.zeros(2, dtype=torch.float64)
    chunks = [rows[i: i + tc.micro_rows] for i in range(0, len(rows), tc.micro_rows)]
    bf16 = d.device.type == "cuda" and tc.dtype != "float32"
    for i, chunk in enumerate(chunks):
        batch = {k: torch.stack([r[k] for r, _ in chunk]).to(d.device) for k in chunk[0][0]}
        with grad_sync(model, not train or i == len(chunks) - 1), \
                torch.autocast(d.device.type, dtype=getattr(torch, tc.dtype), enabled=bf16):
            total, lm, diff = forward(batch, n_text / d.world, n_audio / d.world)
            if train:
                total.backward()
        parts += torch.tensor([lm.item(), diff.item()], dtype=torch.float64)
    lm, diff = (all_sum(parts.to(d.device)).cpu() / d.world).tolist()
    return dict(lm=lm, diff=diff, tokens=tokens, dropped=dropped)


@torch.no_grad()
def evaluate_sct(sct: SCT, model, forward, data: TaskData, mixture, d: Dist, tc: SCTTrainConfig,
                 dc: DiffusionConfig, seed: int) -> dict[str, float]:
    """Held-out losses on tc.eval_rows fixed rows, every rank its share (FSDP needs every rank's forwards)."""
    sct.eval()
    rows = [draw_row(data, mixture, tc.seq_len, dc, 0.0, seed, "eval", j) for j in range(d.rank, tc.eval_rows, d.world)]
    r = run_rows(model, forward, rows, d, tc, train=False)
    sct.train()
    return {"loss": r["lm"] + dc.loss_weight * r["diff"], "lm": r["lm"], "diff": r["diff"]}


def train_sct(stage: str, cfg: dict, data: Path, out: Path, seed: int, d: Dist, stop_after: int | None = None) -> Path:
    """One SCT stage: DDP/FSDP2, gradient accumulation, AdamW + lr_at, periodic eval, keep-last-N checkpoints."""
    st, tc, loop, dc = cfg[stage], cfg["sct"], cfg["sct_loop"], cfg["diffusion"]
    final = out / SCT_FINAL[stage]
    if final.exists():
        print(f"{stage}: {final} exists; skipping")
        return final
    if tc.batch_rows % (tc.micro_rows * d.world):
        raise ValueError(f"--sct.batch_rows {tc.batch_rows} must be a multiple of --sct.micro_rows {tc.micro_rows} "
                         f"x {d.world} ranks")
    if tc.eval_rows % d.world:    # with FSDP every rank must run the same number of forwards, or collectives hang
        raise ValueError(f"--sct.eval_rows {tc.eval_rows} must be a multiple of the {d.world} ranks")
    per_rank = tc.batch_rows // d.world
    tok = TextTokenizer(out / "tokenizer.model")
    trained_with = {"tokenizer_vocab_size": tok.vocab_size, "tokenizer_sha256": file_sha256(out / "tokenizer.model"),
                    "vae_audio_dim": 2 * load_checkpoint(out / "vae.pt", "vae")["config"]["latent_dim"],
                    "vae_sha256": file_sha256(out / "vae.pt")}
    ckpts = Checkpoints(out / stage, loop.keep_last, {
        "sct_model": asdict(cfg["sct_model"]), "sct": asdict(tc), "diffusion": asdict(dc), "stage": asdict(st),
        "data": asdict(cfg["data"]), "seed": seed, "trained_with": trained_with})
    ckpt = ckpts.resume()
    torch.manual_seed(seed)
    sct = load_model(SCT, ckpts.path, ckpt=ckpt) if ckpt else build_sct(stage, cfg, out, trained_with)
    n_params = sum(p.numel() for p in sct.parameters())
    sct.gradient_checkpointing = tc.gradient_checkpointing
    core = TransfusionForcing(sct.to(d.device), dc.loss_weight)
    model = wrap_model(core, d, tc.fsdp)
    forward = torch.compile(model) if tc.compile else model
    opt = adamw(core, st.lr, tc.weight_decay, betas=tc.betas, fused=d.device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, st.steps, st.warmup_steps,
                                                                   tc.final_lr_fraction))
    objects = {"optimizer": (core, opt), "scheduler": sched}
    step, history, evals = 0, [], []
    if ckpt:
        load_state(ckpt, ckpts.path, objects)
        step, history, evals = ckpt["step"], ckpt["history"], ckpt["evals"]
    train_data, eval_data = (TaskData(cfg["data"], data, out / "latents", split, tok, sct.config.audio_dim,
                                      st.validated_only) for split in ("train", "eval"))
    mixture, eval_mixture = train_data.mixture(st.mixture, strict=True), eval_data.mixture(st.mixture, strict=False)
    if d.main:
        if ckpt:
            print(f"{stage}: resuming from step {step} ({ckpts.path})")
        print(f"{stage}: SCT {n_params / 1e6:.1f} M parameters, {d.world} rank(s) on {d.device}, {tc.batch_rows} x "
              f"{tc.seq_len} tokens per step, accumulation {per_rank // tc.micro_rows}")
        print(f"{stage}: training tasks {dict(zip(*mixture))}, held-out tasks {eval_mixture[0]} "
              f"(tasks without data are left out)")
    flops_per_token = 6 * n_params + 12 * len(sct.model.layers) * \
        sct.config.num_attention_heads * sct.config.head_dim * tc.seq_len
    sums, n, t0 = {}, 0, time.perf_counter()
    sct.train()
    for step in tqdm(range(step, st.steps), initial=step, total=st.steps, desc=stage, disable=not d.main,
                     dynamic_ncols=True):
        rows = [draw_row(train_data, mixture, tc.seq_len, dc, dc.cfg_dropout, seed, step, j)
                for j in range(d.rank * per_rank, (d.rank + 1) * per_rank)]   # this rank's rows of the global batch
        r = run_rows(model, forward, rows, d, tc, train=True)
        gnorm = torch.nn.utils.clip_grad_norm_(core.parameters(), tc.grad_clip)
        r["gnorm"] = (gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm).item()  # DTensor under FSDP2
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sums, n, done = {k: sums.get(k, 0.0) + v for k, v in r.items()}, n + 1, step + 1
        if done % loop.log_every == 0 or done == st.steps:
            dt = time.perf_counter() - t0
            lm, diff = sums["lm"] / n, sums["diff"] / n
            h = dict(step=done, loss=lm + dc.loss_weight * diff, lm=lm, diff=diff, gnorm=sums["gnorm"] / n,
                     lr=sched.get_last_lr()[0], ms_per_step=1000 * dt / n, tok_s=sums["tokens"] / dt,
                     dropped=int(sums["dropped"]))
            history.append(h)
            mfu = f" | mfu {100 * flops_per_token * h['tok_s'] / (tc.peak_tflops * 1e12 * d.world):.1f}%" \
                if d.device.type == "cuda" else ""
            if d.main:
                tqdm.write(f"{stage} step {done:6d} | loss {h['loss']:.4f} lm {lm:.4f} diff {diff:.4f} | gnorm "
                           f"{h['gnorm']:.3f} | lr {h['lr']:.2e} | {h['ms_per_step']:.0f} ms/step | "
                           f"{h['tok_s']:.0f} tok/s{mfu} | dropped {h['dropped']} too long")
            sums, n, t0 = {}, 0, time.perf_counter()
        if done % loop.eval_every == 0 or done == st.steps:
            evals.append({"step": done, **evaluate_sct(sct, model, forward, eval_data, eval_mixture, d, tc, dc, seed)})
            if d.main:
                tqdm.write(f"{stage} eval {done:6d} | " + " ".join(f"{k} {v:.4f}" for k, v in evals[-1].items()
                                                                  if k != "step"))
            t0 = time.perf_counter()                                    # ms/step counts training only
        if done % loop.save_every == 0 and done < st.steps:
            state = state_of({"model": sct, **objects})                 # a collective: every rank gathers
            if d.main:                                                  # rank 0 saves, then every rank waits
                ckpts.save(done, {**state, "config": asdict(sct.config), "history": history, "evals": evals},
                           {"stage": stage, "last": history[-1:], "evals": evals, "world_size": d.world})
            barrier()
        if stop_after is not None and done >= stop_after:
            raise SystemExit(f"{stage}: stopped after step {done} (--stop-after)")
    model_sd = get_model_state_dict(sct, options=FULL)
    if d.main:
        save_checkpoint(final, {"kind": "sct", "config": asdict(sct.config), "model": model_sd, "stage": stage,
                                "step": st.steps, "train_config": {k: asdict(v) for k, v in cfg.items()},
                                "trained_with": trained_with, "history": history, "evals": evals})
        print(f"{stage}: saved {final}")
    barrier()
    return final


# -----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_args(argv)
    d = setup_distributed(args.device)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // (2 * local_world)))
    if d.main:                                                    # the effective configuration, one line per section
        print(f"run: preset {args.preset}, stage {args.stage}, data {args.data}, out {args.out}, seed {args.seed}, "
              f"{d.world} rank(s)")
        for name, section in cfg.items():
            print(f"{name}: {json.dumps(asdict(section))}")
    try:
        for stage in PRESET_STAGES[args.preset] if args.stage == "all" else (args.stage,):
            start = time.time()
            if stage == "data":
                run_data(cfg["data"], args.data, d)
            elif stage == "tokenizer":
                if d.main:
                    run_tokenizer(cfg["data"], args.data, args.out, args.preset)
                barrier()
            elif stage in ("vae", "flam"):
                if not (args.out / f"{stage}.pt").exists():
                    single_process_stage(stage, d, args.out)
                if d.main and stage == "vae":
                    train_vae(cfg["vae_model"], cfg["vae"], cfg["vae_loop"], args.data, args.out, args.seed,
                              args.stop_after)
                elif d.main:
                    train_flam(cfg["flam_model"], cfg["flam"], cfg["flam_loop"], args.data, args.out, args.seed,
                               args.stop_after)
            elif stage == "latents":
                run_latents(cfg["data"], args.data, args.out, d)
            else:
                train_sct(stage, cfg, args.data, args.out, args.seed, d, args.stop_after)
            if d.main:
                print(f"{stage}: stage took {(time.time() - start) / 60:.1f} min wall time")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
