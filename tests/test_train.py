"""Tests for train.py: flags, the VAE stage, the data layout and packing, the SCT loop on 1 process vs
torchrun DDP/FSDP2 (gloo), exact resume after a hard stop, and the clear errors.

The fixtures are made here: a 5 + 2 conversation copilot dataset, a tokenizer trained on it, a tiny random
VAE, the latents stage run on them, and a tiny SCT given by flags.
"""
import dataclasses
import json
import math
import os
import threading
import time
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import sample
import train
from copilot import DatasetConfig, caption_of, read_conversations, scene_to_json, write_dataset
from diffusion import DiffusionConfig, alpha_sigma, v_to_x0_eps
from metrics import SmallFLAM
from model import SCT, SCTConfig
from tokenizer import (DESCRIBE, REQUESTS, SAMPLE_RATE, AudioError, CheckpointError, StereoVAE, TextTokenizer,
                       Turn, VAEConfig, encode_conversation, load_model)

ROOT = Path(__file__).resolve().parents[1]
TINY = VAEConfig(latent_dim=4, encoder_dim=2, decoder_dim=16, strides=(4, 5, 6, 10), dilations=(1,),
                 stft_ffts=(256,), mel_windows=(256,), mel_bins=(20,), gan=False, gain_shape=True)   # as the toy preset
TINY_SCT = ("--sct_model.hidden_size 32 --sct_model.intermediate_size 64 --sct_model.num_hidden_layers 2 "
            "--sct_model.num_generation_layers 1 --sct_model.num_attention_heads 2 --sct_model.num_key_value_heads 1 "
            "--sct_model.head_dim 16 --sct_model.query_pre_attn_scalar 16 --sct.seq_len 1024 --sct.batch_rows 4 "
            "--sct.eval_rows 2 --sct_loop.log_every 1 --sct_loop.eval_every 3 --sct_loop.save_every 2 "
            "--sct1.steps 5 --sct1.warmup_steps 1 "
            "--sct1.mixture story=1,edit=1,upload_edit=1,understand=1,t2a=1,caption=1,text=1 --threads 1 "
            "--sct.lm_chunk 64").split()                     # several LM chunks per micro-batch, under DDP and FSDP2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(data folder, checkpoint folder holding tokenizer.model, vae.pt and latents/) shared by the module."""
    root = tmp_path_factory.mktemp("toy")
    data, out = root / "data", root / "ck"
    write_dataset(data, 5, 2, DatasetConfig(t2a_frac=0.4))
    train.main(["--stage", "tokenizer", "--data", str(data), "--out", str(out), "--data.vocab_size", "600",
                "--threads", "1"])
    torch.manual_seed(0)
    train.save_checkpoint(out / "vae.pt", {"kind": "vae", "config": asdict(TINY), "model": StereoVAE(TINY).state_dict(),
                                           "done": True, "step": 0})
    train.main(["--stage", "latents", "--data", str(data), "--out", str(out), "--threads", "1"])
    return data, out


def fresh_copy(toy, dest: Path) -> Path:
    """A checkpoint folder with the fixture's tokenizer, VAE and latents (latents linked, not copied)."""
    dest.mkdir()
    for name in ("tokenizer.model", "vae.pt"):
        (dest / name).write_bytes((toy[1] / name).read_bytes())
    (dest / "latents").symlink_to(toy[1] / "latents")
    return dest


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def single_run(toy, tmp_path_factory):
    out = fresh_copy(toy, tmp_path_factory.mktemp("single") / "ck")
    train.main(["--stage", "sct1", "--data", str(toy[0]), "--out", str(out), *TINY_SCT])
    return out


# -----------------------------------------------------------------------------
# Flags and presets

def test_every_field_has_a_flag_with_help_and_typed_values():
    args, cfg = train.parse_args(["--sct.seq_len", "512", "--sct1.mixture", "story=1,text=2.5",
                                  "--vae_model.strides", "4,5,6,10", "--vae_model.frame_rate", "40",
                                  "--sct_model.sliding_window", "none",
                                  "--sct.fsdp", "true", "--sct.betas", "0.9,0.99", "--diffusion.cfg_weight", "2"])
    assert cfg["sct"].seq_len == 512 and cfg["sct"].fsdp is True and cfg["sct"].betas == (0.9, 0.99)
    assert cfg["sct1"].mixture == {"story": 1.0, "text": 2.5} and cfg["vae_model"].strides == (4, 5, 6, 10)
    assert cfg["sct_model"].sliding_window is None and cfg["diffusion"].cfg_weight == 2.0
    assert cfg["sct2"] == train.PRESETS["toy"]["sct2"], "sections not named on the command line keep the preset"
    for name, section in cfg.items():
        missing = [f.name for f in fields(section) if not f.metadata.get("help")]
        assert not missing, f"{name}: fields without a help comment: {missing}"
    with pytest.raises(SystemExit):
        train.parse_args(["--sct.fsdp", "maybe"])
    _, paper = train.parse_args(["--preset", "audiochat"])
    table5 = [(paper[s].steps, paper[s].lr, paper[s].warmup_steps) for s in ("sct1", "sct2", "sct3")]
    assert table5 == [(100_000, 2.5e-5, 500), (100_000, 2.5e-5, 0), (20_000, 1e-4, 2500)], table5
    assert paper["sct_model"].num_hidden_layers + paper["sct_model"].num_generation_layers == 39


def test_readme_schedule_table_matches_the_presets():
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 5 and cells[0].strip("`") in ("vae", "flam", "sct1", "sct2", "sct3"):
            rows[cells[0].strip("`")] = cells
    assert sorted(rows) == ["flam", "sct1", "sct2", "sct3", "vae"], f"README schedule table rows: {sorted(rows)}"
    for stage, cells in rows.items():
        for preset, cell in (("toy", cells[2]), ("audiochat", cells[4])):
            steps, lr, warmup = (x.replace(" ", "") for x in cell.split(","))
            want = train.PRESETS[preset][stage]
            assert (int(steps), float(lr), int(warmup)) == (want.steps, want.lr, want.warmup_steps), \
                f"README {stage} {preset}: steps, lr, warm-up {cell!r}; train.PRESETS: {want}"


def test_readme_file_map_counts_the_lines_of_each_file():
    """The README's file map gives each top-level file's length in lines; it must not drift from the files."""
    counts = {}
    for line in (ROOT / "README.md").read_text().split("## Files")[1].split("\n## ")[0].splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 3 and cells[1].isdigit():
            counts[cells[0].strip("`")] = int(cells[1])
    files = ["tokenizer.py", "model.py", "diffusion.py", "copilot.py", "metrics.py", "train.py", "sample.py"]
    want = {f: len((ROOT / f).read_text().splitlines()) for f in files}
    want["tests/"] = sum(len(p.read_text().splitlines()) for p in (ROOT / "tests").glob("*.py"))
    assert counts == want, f"README file map {counts}; the files {want}"


def test_audiochat_preset_runs_as_the_readme_memory_table_says():
    sys.path.insert(0, str(ROOT / "bench"))
    from memory import memory_estimate
    _, cfg = train.parse_args(["--preset", "audiochat"])
    tc = cfg["sct"]
    assert tc.fsdp and tc.gradient_checkpointing and tc.micro_rows == 4 and tc.dtype == "bfloat16", tc
    want = memory_estimate(cfg["sct_model"], tc, world=8)
    table = {}
    for line in (ROOT / "README.md").read_text().split("## Paper scale")[1].splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 2 and cells[0] in want:
            table[cells[0]] = float(cells[1])
    assert table == {k: round(v, 1) for k, v in want.items()}, f"README memory table {table}, estimate {want}"
    assert want["total"] < 70, f"{want['total']:.1f} GB leaves too little of 80 GB for the allocator and NCCL"
    no_ckpt = memory_estimate(cfg["sct_model"], dataclasses.replace(tc, gradient_checkpointing=False, micro_rows=1), 8)
    assert no_ckpt["total"] > 80, "without activation checkpointing one row does not fit: the preset needs it"


# -----------------------------------------------------------------------------
# VAE stage (single process)

def vae_sections(**tc):
    tc = train.VAETrainConfig(**{**dict(steps=4, batch_size=2, crop_seconds=0.05, lr=1e-3, warmup_steps=1,
                                        heldout_fraction=0.5, eval_seconds=0.1, stats_crops=8), **tc})
    return TINY, tc, train.LoopConfig(log_every=2, eval_every=2, save_every=2)


def write_scenes(folder, n=4):
    folder.mkdir()
    t = np.arange(SAMPLE_RATE // 4) / SAMPLE_RATE
    for i in range(n):
        tone = 0.3 * np.sin(2 * np.pi * (300 + 100 * i) * t)
        sf.write(folder / f"s{i}.wav", np.stack([tone, 0.5 * tone], 1).astype(np.float32), SAMPLE_RATE)
    sf.write(folder / "mono.flac", (0.1 * np.sin(2 * np.pi * 500 * t)).astype(np.float32), SAMPLE_RATE)


def test_vae_resume_continues_exactly(tmp_path, monkeypatch):
    write_scenes(tmp_path / "data")
    straight = train.train_vae(*vae_sections(), tmp_path / "data", tmp_path / "a", 0)
    calls = {"n": 0}
    real_loss = train.vae_loss

    def crash_on_third_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash after the step-2 checkpoint")
        return real_loss(*a, **k)

    monkeypatch.setattr(train, "vae_loss", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        train.train_vae(*vae_sections(), tmp_path / "data", tmp_path / "b", 0)
    assert not (tmp_path / "b" / "vae.pt").exists(), "a stopped stage writes no final file"
    assert torch.load(tmp_path / "b" / "vae" / "step-000002.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(train, "vae_loss", real_loss)
    resumed = train.train_vae(*vae_sections(), tmp_path / "data", tmp_path / "b", 0)
    a, b = (torch.load(p, weights_only=True) for p in (straight, resumed))
    assert a["step"] == b["step"] == 4 and a["kind"] == b["kind"] == "vae"
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"{key} differs after resuming"
    vae = load_model(StereoVAE, resumed)
    assert not torch.equal(vae.latent_scale, torch.ones(vae.audio_dim)), "normalisation must be fitted at the end"
    assert sorted(str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*")) == [
        "vae", "vae.pt", "vae/step-000002.json", "vae/step-000002.pt"], "no temporary files left"
    before = resumed.stat().st_mtime_ns
    train.train_vae(*vae_sections(), tmp_path / "data", tmp_path / "b", 0)
    assert resumed.stat().st_mtime_ns == before, "a finished VAE stage is skipped"


class Stop(Exception):
    pass


def test_vae_and_flam_stages_run_on_the_device_they_are_given(toy, tmp_path, monkeypatch):
    """The meta device stands for a GPU: a module or batch left on the CPU would show up as 'cpu' here."""
    write_scenes(tmp_path / "data")
    seen, real_vae_loss = {}, train.vae_loss

    def vae_spy(vae, audio, disc=None):
        seen["vae"] = {next(vae.parameters()).device.type, audio.device.type}
        with pytest.raises(NotImplementedError):          # meta has no values: boolean indexing in the KL fails
            real_vae_loss(vae, audio, disc)
        raise Stop

    def flam_spy(model, audio, captions, targets):
        seen["flam"] = {next(model.parameters()).device.type, audio.device.type, targets.device.type}
        raise Stop
    monkeypatch.setattr(train, "vae_loss", vae_spy)
    monkeypatch.setattr(SmallFLAM, "loss", flam_spy)
    with pytest.raises(Stop):
        train.train_vae(*vae_sections(), tmp_path / "data", tmp_path / "a", 0, device="meta")
    with pytest.raises(Stop):
        train.train_flam(SmallFLAM.config_class(), train.FLAMTrainConfig(steps=2, batch_size=2, eval_clips=2),
                         train.LoopConfig(), toy[0], tmp_path / "b", 0, device="meta")
    assert seen == {"vae": {"meta"}, "flam": {"meta"}}, f"devices seen: {seen}"


def test_heldout_split_is_every_kth_item_in_linear_time():
    train_part, held = train.split_heldout(list(range(10)), 0.2)
    assert held == [4, 9] and train_part == [0, 1, 2, 3, 5, 6, 7, 8]
    assert train.split_heldout(["one"], 0.5) == (["one"], [])
    files = [(f"f{i}.flac", i, 48000) for i in range(300_000)]
    start = time.perf_counter()                       # the old list-membership split took minutes at this size
    train_part, held = train.split_heldout(files, 0.05)
    assert len(held) == 15_000 and len(train_part) == 285_000 and time.perf_counter() - start < 2, "not O(n)"


def test_audio_data_errors_and_crops(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        train.find_audio(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .wav or .flac"):
        train.find_audio(tmp_path / "empty")
    (tmp_path / "six").mkdir()
    sf.write(tmp_path / "six" / "x.wav", np.zeros((10, 6), dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="6 channels"):
        train.find_audio(tmp_path / "six")
    write_scenes(tmp_path / "data", n=2)
    batch = train.crop_batch(train.find_audio(tmp_path / "data"), 6, SAMPLE_RATE // 2, torch.Generator().manual_seed(0))
    assert batch.shape == (6, 2, SAMPLE_RATE // 2) and (batch[:, :, SAMPLE_RATE // 4:] == 0).all()


def test_schedules():
    lrs = [train.lr_at(s, 1.0, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])), "cosine decay must not increase"
    cos = [train.lr_at(s, 1.0, 100, 0, 0.2) for s in range(101)]
    assert cos[0] == 1.0 and cos[50] == pytest.approx(0.6) and cos[100] == pytest.approx(0.2)
    assert train.lr_at(5, 3e-3, 100, 10, 0.1) == 3e-3 * 6 / 10, "the peak scales the schedule"


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    train.save_checkpoint(path, {"kind": "vae", "a": torch.ones(2)})

    def broken_save(obj, f):
        open(f, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(path, {"kind": "vae", "a": torch.zeros(2)})
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2)), "the old checkpoint must survive"
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_resume_clears_what_a_killed_save_left(tmp_path):
    """kill -9 in a save or a prune: a .tmp, a .json without its .pt, one checkpoint too many. Resuming removes
    them (bench/soak.py found the orphan .json), so the stage ends with the files of an uninterrupted run."""
    ckpts = train.Checkpoints(tmp_path, 2, {"seed": 0}, extra={"w": torch.ones(1)})
    for step in (1, 2, 3):
        ckpts.save(step)
    (tmp_path / "step-000004.json").write_text("{}")                 # killed before its .pt
    (tmp_path / "step-000004.pt.x1y2.tmp").write_bytes(b"half")      # killed mid-write
    (tmp_path / "step-000001.pt").write_bytes((tmp_path / "step-000002.pt").read_bytes())   # a prune killed midway
    assert ckpts.read()["step"] == 3 and ckpts.path.name == "step-000003.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002.json", "step-000002.pt", "step-000003.json",
                                                          "step-000003.pt"]


# -----------------------------------------------------------------------------
# Latents, documents and packing

def test_latents_are_the_normalised_vae_encoding_and_resumable(toy, capsys):
    data, out = toy
    conv = read_conversations(data, "eval")[1]
    cached = torch.load(out / "latents" / "stories" / "eval" / f"{conv.id}.pt", weights_only=True)["latents"]
    vae = load_model(StereoVAE, out / "vae.pt")
    with torch.no_grad():
        expected = [vae.encode(train.load_audio(t.audio)[None])[0] for t in conv.turns]
    assert len(cached) == len(conv.turns) and cached[0].dtype == torch.float16
    for got, want in zip(cached, expected):
        assert got.shape == want.shape == (conv.turns[0].scene.num_frames(vae.config.frame_rate), vae.audio_dim)
        torch.testing.assert_close(got.float(), want, atol=2e-3 * want.abs().max().item(), rtol=1e-3)
    train.main(["--stage", "latents", "--data", str(data), "--out", str(out), "--threads", "1"])
    assert "7 items, 0 to encode" in capsys.readouterr().out


def task_data(toy, split="train", **kw) -> train.TaskData:
    data, out = toy
    cfg = train.DataConfig(**kw)
    tok = TextTokenizer(out / "tokenizer.model")
    return train.TaskData(cfg, data, out / "latents", split, tok, 2 * TINY.latent_dim)


def test_documents_follow_the_paper_layout(toy):
    td = task_data(toy)

    def doc(task, k):
        _, c, _ = item = next(it for it in map(td.item, [task] * td.size(task), range(td.size(task))) if it[2] == k)
        return td.build(task, item, random.Random(0)), td.conversation(c)

    (user, model), conv = doc("story", 0)
    assert user.parts == [conv.turns[0].instruction] and model.parts[0] == scene_to_json(conv.turns[0].scene)
    assert model.parts[1].shape == (conv.turns[0].scene.num_frames(TINY.frame_rate), 8)
    (user, model), conv = doc("upload_edit", 2)
    assert torch.is_tensor(user.parts[0]) and user.parts[1] == conv.turns[2].instruction
    assert model.parts[:2] == [scene_to_json(caption_of(conv.turns[1].scene)), scene_to_json(conv.turns[2].scene)]
    turns, conv = doc("edit", 2)            # context_turns 2: turn 1 as an upload edit, then turn 2 (Eq. 3)
    assert [t.role for t in turns] == ["user", "model"] * 2
    assert turns[1].parts[:2] == [scene_to_json(caption_of(conv.turns[0].scene)), scene_to_json(conv.turns[1].scene)]
    assert turns[2].parts == [conv.turns[2].instruction] and turns[3].parts[0] == scene_to_json(conv.turns[2].scene)
    turns, conv = doc("edit", 1)             # a window that starts at turn 0 is the plain chat
    assert [t.parts[0] for t in turns[::2]] == [conv.turns[0].instruction, conv.turns[1].instruction]
    (user, model), conv = doc("understand", 1)
    assert user.parts[1] in REQUESTS["understand"]
    assert model.parts == [scene_to_json(caption_of(conv.turns[1].scene))]
    (user, model), conv = doc("caption", 0)
    assert model.parts == [conv.turns[0].scene.sounds[0].text] and conv.turns[0].kind == "t2a"
    (user, model), conv = doc("t2a", 0)
    assert user.parts == [conv.turns[0].instruction] and torch.is_tensor(model.parts[0])


def test_sample_prompts_are_prefixes_of_training_documents(toy):
    """What sample.py asks the model is a token prefix of the document train.py trains on for the same turn: a
    story, a later chat turn (after the reference turns, as bench/eval_split.py gives them), an upload edit and a
    describe."""
    sys.path.insert(0, str(ROOT / "bench"))
    import eval_split
    td = task_data(toy, "eval")
    conv = td.conversation(0)
    z = td.latents(f"stories/eval/{conv.id}")
    seed = next(s for s in range(100) if random.Random(s).choice(REQUESTS["understand"]) == DESCRIBE)
    instruction = [{"instruction": t.instruction} for t in conv.turns]
    cases = {"story": (td.build("story", ("conv", 0, 0), random.Random(0)),
                       sample.request([], "story", instruction[0])),
             "later chat turn": (td.build("edit", ("conv", 0, 1), random.Random(0)),
                                 sample.request(eval_split.reference_history(conv, 1, z), "story", instruction[1])),
             "upload edit": (td.build("upload_edit", ("conv", 0, 2), random.Random(0)),
                             sample.request([], "upload_edit", {"clip": z[1], **instruction[2]})),
             "describe": (td.build("understand", ("conv", 0, 1), random.Random(seed)),
                          sample.request([], "understand", {"clip": z[1], "request": DESCRIBE}))}
    for name, (document, prompt) in cases.items():
        doc = encode_conversation(document, td.tok).ids.tolist()
        asked = encode_conversation(prompt, td.tok, generation_prompt=True).ids.tolist()
        assert len(doc) > len(asked) and doc[: len(asked)] == asked, \
            f"{name}: the prompt is not a prefix of the training document; they part at token " \
            f"{next((i for i, (a, b) in enumerate(zip(doc, asked)) if a != b), min(len(doc), len(asked)))}"


def test_cfg_dropout_gives_the_unconditional_document(toy):
    td = task_data(toy)
    tok = td.tok
    turns = td.document("story", random.Random(0))
    ex = encode_conversation(turns, tok)
    doc = train.noise_document(ex, torch.Generator().manual_seed(0), DiffusionConfig(), 1.0, tok)
    frames = int(ex.audio_mask.sum())
    head = [tok.bos_id, tok.start_of_turn_id] + tok.encode("model\n") + [tok.audio_start_id]
    assert doc["ids"][: len(head)].tolist() == head and int(doc["audio_mask"].sum()) == frames
    assert doc["ids"][len(head) + frames: len(head) + frames + 2].tolist() == [tok.audio_end_id, tok.end_of_turn_id]
    assert doc["loss_mask"].sum() == frames, "the unconditional span is the target"
    alpha = torch.cos(doc["t"][doc["audio_mask"]] * torch.pi / 2)
    assert torch.all((alpha > 0) & (alpha < 1)), "the target span is noised (t in (0, 1))"
    for seed in range(4):                     # Diffusion Forcing: x_t, v and t line up with the clean latents
        doc = train.noise_document(ex, torch.Generator().manual_seed(seed), DiffusionConfig(), 0.0, tok)
        at = doc["audio_mask"]
        x0, _ = v_to_x0_eps(doc["audio"][at], doc["v"][at], doc["t"][at])
        torch.testing.assert_close(x0, ex.latents, atol=1e-5, rtol=1e-5)
        span_t = [doc["t"][ex.span_ids == k].unique() for k in (1, 2) if (ex.span_ids == k).any()]
        assert all(len(u) == 1 for u in span_t), "one time per span"
        assert torch.equal(doc["loss_mask"], at & (doc["t"] > 0)) and torch.equal(doc["ids"], ex.ids)


def test_documents_that_only_read_audio_are_never_noised(toy):
    """Understanding, captioning and the uploaded clip of an edit are read, not generated: t = 0, the clean latents,
    no diffusion loss, whatever the seed (measured before: 74 % of such spans were noised)."""
    td = task_data(toy)
    dc = DiffusionConfig()
    for task in ("understand", "caption", "upload_edit"):
        for seed in range(12):
            ex = encode_conversation(td.document(task, random.Random(seed)), td.tok)
            doc = train.noise_document(ex, torch.Generator().manual_seed(seed), dc, 0.0, td.tok)
            read = ex.span_is_model.logical_not().nonzero().flatten() + 1             # span ids of user clips
            at = torch.isin(ex.span_ids, read)
            assert len(read) == 1 and (doc["t"][at] == 0).all() and not doc["loss_mask"][at].any(), (task, seed)
            torch.testing.assert_close(doc["audio"][at], ex.latents[torch.isin(ex.span_ids[ex.audio_mask], read)])
            assert (doc["t"][ex.audio_mask & ~at] > 0).all(), f"{task}: the generated span is the noised target"


def test_a_text_window_cut_from_a_longer_text_has_no_eos(toy, tmp_path):
    words = " ".join(f"word{i}" for i in range(400))
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": words}) + "\n")
    (tmp_path / "index-train.json").write_text(json.dumps(dict(file=[], turns=[], valid=[], single=[])))
    td = train.TaskData(train.DataConfig(text_corpora=(str(tmp_path / "corpus.jsonl"),), heldout_every=1000), tmp_path,
                        tmp_path, "train", TextTokenizer(toy[1] / "tokenizer.model"), 8)       # the corpus alone
    text = td.tok.encode(words)
    ends = []
    for j in range(30):
        row, stats = train.draw_row(td, (["text"], [1.0]), 64, DiffusionConfig(), 0.0, 0, 0, j)
        ids = row["ids"][row["doc_ids"] == 0].tolist()
        assert ids[0] == td.tok.bos_id
        window = ids[1:-1] if ids[-1] == td.tok.eos_id else ids[1:]
        start = next(i for i in range(len(text)) if text[i: i + len(window)] == window)
        ends.append(start + len(window) == len(text))
        assert (ids[-1] == td.tok.eos_id) == ends[-1], f"row {j}: <eos> {ids[-1] == td.tok.eos_id}, cut {not ends[-1]}"
    assert not all(ends), "some windows must be cut"


def test_rows_are_packed_isolated_and_stateless(toy):
    td = task_data(toy)
    mixture = td.mixture(dict(story=1, edit=1, upload_edit=1, understand=1, t2a=1, caption=1, text=1), strict=True)
    dc = DiffusionConfig()
    row, stats = train.draw_row(td, mixture, 1500, dc, 0.1, 0, 7, 3)
    again, _ = train.draw_row(td, mixture, 1500, dc, 0.1, 0, 7, 3)
    other, _ = train.draw_row(td, mixture, 1500, dc, 0.1, 0, 7, 4)
    assert all(torch.equal(row[k], again[k]) for k in row), "a row is a pure function of (seed, step, row)"
    assert not torch.equal(row["ids"], other["ids"])
    assert all(v.shape[0] == 1500 for v in row.values()) and stats["docs"] >= 1
    starts = torch.nonzero(torch.diff(row["doc_ids"], prepend=torch.tensor([-1]))).flatten()
    assert row["ids"][starts[: stats["docs"]]].eq(td.tok.bos_id).all(), "every document starts with <bos>"
    assert torch.equal(row["doc_ids"], row["doc_ids"].sort().values), "documents are contiguous runs"
    pad = row["doc_ids"] == stats["docs"]
    assert pad.sum() == 1500 - stats["tokens"] and (row["labels"][pad] == -100).all()
    assert not row["audio_mask"][pad].any()
    assert not (row["loss_mask"] & ~row["audio_mask"]).any() and (row["t"][~row["audio_mask"]] == 0).all()
    assert not (row["labels"][~pad][row["audio_mask"][~pad]] != -100).any(), "no LM loss on audio frames"
    dropped, stats = train.draw_row(td, td.mixture(dict(story=1, edit=1, t2a=1), True), 1500, dc, 1.0, 0, 7, 3)
    assert all(v.shape[0] == 1500 for v in dropped.values()) and (dropped["doc_ids"] == stats["docs"]).sum() == \
        1500 - stats["tokens"] and dropped["audio_mask"].sum() == dropped["loss_mask"].sum() > 0
    _, short = train.draw_row(td, mixture, 400, dc, 0.1, 0, 7, 3)
    assert short["dropped"] > 0, "documents longer than a row are dropped and counted"


def items(td: train.TaskData, task: str) -> list:
    return [td.item(task, j)[1] for j in range(td.size(task))]


def test_rows_are_drawn_ahead_by_a_background_thread_and_do_not_change(toy):
    td = task_data(toy)
    mixture = td.mixture(dict(story=1, edit=1, understand=1, t2a=1, caption=1, text=1), strict=True)
    threads = []

    def rows(step):
        threads.append(threading.current_thread().name)
        return train.draw_row(td, mixture, 1024, DiffusionConfig(), 0.1, 0, step, 0)[0]
    inline = [rows(s) for s in range(3, 8)]
    ahead = list(train.prefetched(rows, range(3, 8), depth=2))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(inline, ahead) for k in a), "rows depend only on the key"
    assert threads[5:] and all(name.startswith("prefetch") for name in threads[5:]), threads


def test_a_large_conversation_index_loads_in_seconds(toy, tmp_path):
    """Training reads the index the latents stage wrote, not the dataset: 1 M conversations build their pools in
    seconds (copilot.read_conversations would parse 1 M JSON files and check 3 M FLACs)."""
    n = 1_000_000
    g = torch.Generator().manual_seed(0)
    turns, single = torch.randint(1, 6, (n,), generator=g), torch.rand(n, generator=g) < 0.2
    turns[single] = 1
    index = {"file": [f"{i // 1000:05d}/train-{i:07d}.json" for i in range(n)], "turns": turns.tolist(),
             "valid": turns.tolist(), "single": single.tolist()}
    (tmp_path / "index-train.json").write_text(json.dumps(index))
    start = time.perf_counter()
    td = train.TaskData(train.DataConfig(), tmp_path / "no-such-data", tmp_path, "train", TextTokenizer(
        toy[1] / "tokenizer.model"), 8)
    seconds = time.perf_counter() - start
    stories = turns[~single]
    assert td.size("understand") == int(stories.sum()) and td.size("edit") == int((stories - 1).sum())
    assert td.size("t2a") == int(single.sum()) and td.size("text") == n and seconds < 20, f"{seconds:.1f} s"
    i = int((~single).nonzero()[-1])
    assert td.item("understand", td.size("understand") - 1) == ("conv", i, int(turns[i]) - 1)


def test_manifests_and_corpora_feed_their_tasks(toy, tmp_path):
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE                          # 1 s tones
    for name, f in (("a.wav", 440), ("b.wav", 660)):
        sf.write(tmp_path / name, (0.2 * np.sin(2 * np.pi * f * t)).astype(np.float32), SAMPLE_RATE)
    lines = {"speech.jsonl": ['{"audio": "a.wav", "text": "hello there"}', '{"audio": "b.wav", "text": "good night", '
                              '"start": 0.25, "end": 0.75}', '{"audio": "a.wav", "text": "held out"}'],
             "sounds.jsonl": ['{"audio": "b.wav", "text": "a high beep"}'],
             "corpus.jsonl": ['{"text": "One document."}', '{"text": "Another one."}', '{"text": "Held out."}']}
    for name, rows in lines.items():
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    cfg = train.DataConfig(speech_manifests=(str(tmp_path / "speech.jsonl"),), heldout_every=3,
                           sound_manifests=(str(tmp_path / "sounds.jsonl"),),
                           text_corpora=(str(tmp_path / "corpus.jsonl"),))
    out = tmp_path / "ck"
    out.mkdir()
    (out / "vae.pt").write_bytes((toy[1] / "vae.pt").read_bytes())
    train.run_latents(cfg, tmp_path / "no-stories", out, train.Dist())
    tok = TextTokenizer(toy[1] / "tokenizer.model")
    td = train.TaskData(cfg, tmp_path / "no-stories", out / "latents", "train", tok, 8)
    assert [r["text"] for r in items(td, "asr")] == ["hello there", "good night"]
    assert [r["text"] for r in items(td, "text")] == ["One document.", "Another one."]
    user, model = td.build("asr", td.item("asr", 1), random.Random(0))
    assert user.parts[0].shape == (20, 8), "0.25-0.75 s of audio is 20 frames at 40 Hz"
    assert user.parts[1] in REQUESTS["asr"] and model.parts == ["good night"]
    (user, model) = td.build("tts", td.item("tts", 0), random.Random(0))
    assert "hello there" in user.parts[0] and model.parts[0].shape == (40, 8)
    (user, model) = td.build("t2a", td.item("t2a", 0), random.Random(0))
    assert user.parts == ["a high beep"] and torch.is_tensor(model.parts[0])
    held = train.TaskData(cfg, tmp_path, out / "latents", "eval", tok, 8)
    assert [r["text"] for r in items(held, "asr")] == ["held out"]


def test_bad_data_is_named_or_skipped_and_counted(toy, tmp_path, capsys, caplog):
    """A truncated FLAC, a conversation JSON cut in half and a manifest line that is not JSON: an error naming the
    file and --data.skip_bad, or with it each is skipped and counted, and the SCT's data leaves it out."""
    data, out = tmp_path / "data", tmp_path / "ck"
    shutil.copytree(toy[0], data)
    out.mkdir()
    (out / "vae.pt").write_bytes((toy[1] / "vae.pt").read_bytes())
    convs = read_conversations(data, "train")
    flac, cut = convs[0].turns[0].audio, next(data.rglob(f"{convs[1].id}.json"))
    flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 3])
    with pytest.raises(AudioError, match=f"{flac.name}: (truncated|soundfile cannot read).*--data.skip_bad true"):
        train.run_latents(train.DataConfig(), data, out, train.Dist())
    with pytest.raises(AudioError, match=f"{flac.name}: cannot decode it.*--data.skip_bad true"):
        frames = sf.info(str(flac)).frames                                # the header's length: the whole
        train.crop_batch([(flac, frames, SAMPLE_RATE)], 1, frames // 2, torch.Generator().manual_seed(0))
    cut.write_text(cut.read_text()[: len(cut.read_text()) // 2])
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    sf.write(tmp_path / "a.wav", (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SAMPLE_RATE)
    (tmp_path / "sounds.jsonl").write_text('{"audio": "a.wav", "text": "a beep"}\n{"audio": "a.wav", "te\n')
    shutil.rmtree(out / "latents")                                   # the conversation index is made again
    with pytest.raises(ValueError, match=f"{cut.name}: malformed conversation file.*--data.skip_bad true"):
        train.run_latents(train.DataConfig(), data, out, train.Dist())
    with pytest.raises(ValueError, match=r"sounds.jsonl, line 2: not JSON.*--data.skip_bad true"):
        train.read_manifest(tmp_path / "sounds.jsonl", "train", 100)
    capsys.readouterr()
    cfg = train.DataConfig(sound_manifests=(str(tmp_path / "sounds.jsonl"),), skip_bad=True)
    train.run_latents(cfg, data, out, train.Dist())
    printed = capsys.readouterr()
    assert f"--data.skip_bad: skipped stories/train/{convs[0].id}: {flac}" in printed.out
    assert "--data.skip_bad: 1 of " in printed.out and "skipped 1 bad lines of" in printed.out
    assert f"{cut.name}: malformed conversation file (JSONDecodeError" in caplog.text
    assert "skipped 1 of 5 conversation files" in caplog.text
    td = train.TaskData(cfg, data, out / "latents", "train", TextTokenizer(toy[1] / "tokenizer.model"), 8)
    used = {td.conversation(c).id for task in td.pools for source in td.pools[task] if torch.is_tensor(source)
            for c in source[:, 0].tolist()}
    assert used == {c.id for c in convs[2:]}, "the truncated and the cut conversation are out"
    assert [r["text"] for r in td.pools["t2a"][1]] == ["a beep"]
    found = train.find_audio(data / "train", skip_bad=True)
    assert flac not in [f[0] for f in found] and "skipped 1 of" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# The SCT loop: 1 process vs torchrun, exact resume, checkpoint contract

def torchrun(toy, out: Path, *extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--stage", "sct1", "--data", str(toy[0]), "--out", str(out), *TINY_SCT, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_matches_one_process(toy, single_run, tmp_path, mode):
    out = fresh_copy(toy, tmp_path / "ck")
    proc = torchrun(toy, out, "--sct.fsdp", str(mode == "fsdp"), "--sct.micro_rows", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout and ("accumulation 2" in proc.stdout)
    one, two = (torch.load(p / "sct1.pt", weights_only=True) for p in (single_run, out))
    for a, b in zip(one["history"] + one["evals"], two["history"] + two["evals"]):   # global losses and grad norm
        assert [round(a[k], 5) for k in ("step", "lm", "diff")] == [round(b[k], 5) for k in ("step", "lm", "diff")]
        assert b.get("gnorm", 0) == pytest.approx(a.get("gnorm", 0), rel=1e-4), (a, b)
    one, two = one["model"], two["model"]
    assert one.keys() == two.keys()
    for k in one:     # Adam amplifies summation-order differences in near-zero gradients; weights' std is 0.02
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{mode} {k}: {m}")
    assert not torch.equal(one["diffusion_head.weight"], torch.zeros_like(one["diffusion_head.weight"])), "it trained"


def test_hard_stop_then_resume_reaches_the_same_weights(toy, single_run, tmp_path):
    out = fresh_copy(toy, tmp_path / "ck")
    argv = ["--stage", "sct1", "--data", str(toy[0]), "--out", str(out), *TINY_SCT]
    with pytest.raises(SystemExit, match="stopped after step 3"):
        train.main(argv + ["--stop-after", "3"])
    assert sorted(p.name for p in (out / "sct1").iterdir()) == ["step-000002.json", "step-000002.pt"]
    assert json.loads((out / "sct1" / "step-000002.json").read_text())["step"] == 2
    train.main(argv)
    one, resumed = weights(single_run / "sct1.pt"), weights(out / "sct1.pt")
    assert all(torch.equal(one[k], resumed[k]) for k in one), "resuming must reproduce the uninterrupted run exactly"
    assert sorted(p.name for p in (out / "sct1").iterdir()) == ["step-000002.json", "step-000002.pt",
                                                               "step-000004.json", "step-000004.pt"]


def test_sct_checkpoint_contract(toy, single_run):
    ckpt = torch.load(single_run / "sct1.pt", weights_only=True)
    tok = TextTokenizer(toy[1] / "tokenizer.model")
    assert ckpt["kind"] == "sct" and ckpt["stage"] == "sct1" and ckpt["step"] == 5
    assert ckpt["trained_with"] == {"tokenizer_vocab_size": tok.vocab_size,
                                    "tokenizer_sha256": train.file_sha256(toy[1] / "tokenizer.model"),
                                    "vae_audio_dim": 2 * TINY.latent_dim,
                                    "vae_sha256": train.file_sha256(toy[1] / "vae.pt")}
    model = load_model(SCT, single_run / "sct1.pt")
    assert model.config.vocab_size == tok.vocab_size and model.config.audio_dim == 8
    assert ckpt["train_config"]["sct"]["seq_len"] == 1024 and [e["step"] for e in ckpt["evals"]] == [3, 5]
    assert [h["step"] for h in ckpt["history"]] == [1, 2, 3, 4, 5] and ckpt["history"][0]["lm"] > 0


def test_sct2_starts_from_sct1_and_refuses_another_tokenizer(toy, single_run, tmp_path):
    out = fresh_copy(toy, tmp_path / "ck")
    (out / "sct1.pt").write_bytes((single_run / "sct1.pt").read_bytes())
    args, cfg = train.parse_args(["--data", str(toy[0]), "--out", str(out), *TINY_SCT])
    with_ = json.loads(json.dumps(torch.load(out / "sct1.pt", weights_only=True)["trained_with"]))
    model = train.build_sct("sct2", cfg, out, with_)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights(out / "sct1.pt").values()))
    with pytest.raises(ValueError, match="another tokenizer or VAE"):
        train.build_sct("sct2", cfg, out, {**with_, "tokenizer_sha256": "0" * 64})


def test_gpu_smoke_runs_on_the_cpu():
    proc = subprocess.run([sys.executable, "bench/gpu_smoke.py", "--device", "cpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for part in ("attention: flex vs eager", "training: 4 steps", "kill and resume: SIGKILL", "vae: 2 steps"):
        assert part in proc.stdout, f"{part!r} missing from:\n{proc.stdout[-3000:]}"
    assert "max abs weight difference 0.00e+00" in proc.stdout, "resuming on the CPU must be exact"


# -----------------------------------------------------------------------------
# FLAM stage and clear errors

def test_flam_stage_reports_detection_and_writes_the_contract(toy, tmp_path):
    out = tmp_path / "ck"
    train.main(["--stage", "flam", "--data", str(toy[0]), "--out", str(out), "--flam.steps", "3",
                "--flam.batch_size", "2", "--flam.captions", "4", "--flam_loop.save_every", "2", "--threads", "1"])
    ckpt = torch.load(out / "flam.pt", weights_only=True)
    assert ckpt["kind"] == "flam" and 0.0 <= ckpt["detection"]["auroc"] <= 1.0 and "f1" in ckpt["detection"]
    assert isinstance(load_model(SmallFLAM, out / "flam.pt"), SmallFLAM)
    assert [p.name for p in (out / "flam").glob("*.pt")] == ["step-000002.pt"]


def test_clear_errors(toy, single_run, tmp_path):
    bad = tmp_path / "speech.jsonl"
    bad.write_text('{"audio": "a.wav", "text": "hello"}\n{"audio": "b.wav", "text": \n')
    with pytest.raises(ValueError, match=r"speech.jsonl, line 2: not JSON"):
        train.read_manifest(bad, "train", 100)
    bad.write_text('{"audio": "a.wav"}\n')
    with pytest.raises(ValueError, match=r"line 1: needs non-empty string values for \['audio', 'text'\]"):
        train.read_manifest(bad, "train", 100)
    with pytest.raises(FileNotFoundError, match="huggingface-cli download google/gemma-2-2b"):
        train.gemma_dir(train.DataConfig(gemma_dir=str(tmp_path / "no-gemma")))
    with pytest.raises(FileNotFoundError, match="--data.gemma_dir"):
        train.main(["--preset", "audiochat", "--stage", "tokenizer", "--out", str(tmp_path / "p"), "--threads", "1"])
    out = fresh_copy(toy, tmp_path / "ck")
    argv = ["--stage", "sct1", "--data", str(toy[0]), "--out", str(out), *TINY_SCT]
    with pytest.raises(SystemExit):
        train.main(argv + ["--stop-after", "2"])
    (out / "sct1" / "step-000002.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="step-000002.pt holds no checkpoint.*delete it"):
        train.main(argv)
    (out / "sct1" / "step-000002.pt").unlink()
    with pytest.raises(SystemExit):
        train.main(argv + ["--stop-after", "2"])
    with pytest.raises(ValueError, match="other settings.*seq_len"):
        train.main(argv + ["--sct.seq_len", "900"])


# -----------------------------------------------------------------------------
# Text-only plan documents and the conditioning diagnostics

def test_plan_documents_end_each_model_turn_at_the_audio_start(toy):
    """A plan document is the story layout without audio: each plan is followed by the <unused0> that opens its audio
    (the LM learns to stop there, as sample.py expects), the document ends at the last one, and no token is audio."""
    tok = TextTokenizer(toy[1] / "tokenizer.model")
    ex = train.plan_document([("rain please", '{"a":1}'), ("add a dog", '{"b":2}')], tok, audio_dim=8)
    ids, labels = ex.ids.tolist(), ex.labels.tolist()
    assert ids[-1] == tok.audio_start_id and ids.count(tok.audio_start_id) == 2 and not ex.audio_mask.any()
    assert ex.latents.shape == (0, 8) and labels[-1] == -100
    targets = [t for t in labels if t != -100]
    assert tok.decode([t for t in targets if t != tok.audio_start_id]) == '{"a":1}{"b":2}'
    assert targets.count(tok.audio_start_id) == 2 and tok.end_of_turn_id not in targets
    want = encode_conversation([Turn("user", ["rain please"]), Turn("model", ['{"a":1}'])], tok)
    assert ids[:len(want.ids) - 3] == want.ids[:-3].tolist()        # the same layout up to the end of the first plan


class Local(torch.nn.Module):
    """An SCT stand-in that sees each position alone (token embedding, the noisy latent): it ignores every condition."""

    def __init__(self, vocab_size: int, audio_dim: int):
        super().__init__()
        self.config = SCTConfig(vocab_size=vocab_size, audio_dim=audio_dim)
        self.embed, self.head, self.vel = (torch.nn.Embedding(vocab_size, 16), torch.nn.Linear(16, vocab_size),
                                           torch.nn.Linear(audio_dim, audio_dim))

    def forward(self, ids, audio, audio_mask, t, span_ids, doc_ids):
        return self.embed(ids), audio

    def lm_logits(self, h):
        return self.head(h)

    def velocity(self, h):
        return self.vel(h)


class Oracle(Local):
    """Local's text, and the exact velocity of the clean audio of the text it finds in the document (memory: token
    ids of a plan or an instruction -> clean latents; none found: silence): loss 0 given the true text."""

    def __init__(self, vocab_size: int, audio_dim: int, memory: dict[str, torch.Tensor]):
        super().__init__(vocab_size, audio_dim)
        self.memory = memory

    def forward(self, ids, audio, audio_mask, t, span_ids, doc_ids):
        text, m = "," + ",".join(map(str, ids[0].tolist())) + ",", audio_mask[0]
        if not m.any():                                                # a plan document: text only
            return self.embed(ids), audio
        z = next((z for key, z in self.memory.items() if key in text), torch.zeros(0, audio.shape[-1]))
        x0 = torch.zeros(int(m.sum()), audio.shape[-1])
        x0[:len(z)] = z[:len(x0)]                                      # another plan's audio may be longer
        alpha, sigma = alpha_sigma(t[0, m, None])
        h = audio.clone()
        h[0, m] = (alpha * audio[0, m] - x0) / sigma                  # x0 = alpha x_t - sigma v, solved for v
        return self.embed(ids), h

    def velocity(self, h):
        return h


def test_conditioning_gaps_are_zero_for_a_model_that_ignores_its_condition_and_positive_for_one_that_uses_it(toy):
    """The diagnostics' sign: a model that sees neither instruction nor plan has gaps of exactly 0; one that knows
    each plan's audio has positive diffusion and place gaps (and still an LM gap of 0); one that knows each
    instruction's audio (what, not the plan's placement) a positive diffusion gap and a place gap of 0; a tiny SCT
    fitted to write each story's plan from its instruction has a positive LM gap."""
    td, cpu = task_data(toy), torch.device("cpu")
    torch.manual_seed(0)
    zero = train.conditioning_gaps(Local(td.tok.vocab_size, td.audio_dim), td, 8, 0, cpu)
    assert set(zero) == {"lm_plan", "lm_gap", *(f"{k}_gap@{t}" for k in ("diff", "place") for t in (0.3, 0.6, 0.9))}
    assert zero["lm_plan"] > 1 and all(abs(v) < 1e-6 for k, v in zero.items() if "gap" in k), zero
    convs = [td.conversation(c) for c in td.pools["story"][0][:8, 0].tolist()]
    key = lambda text: "," + ",".join(map(str, td.tok.encode(text))) + ","          # noqa: E731
    for memory_of, place in ((lambda t: scene_to_json(t.scene), True), (lambda t: t.instruction, False)):
        memory = {key(memory_of(c.turns[0])): td.latents(f"stories/train/{c.id}")[0] for c in convs}
        oracle = train.conditioning_gaps(Oracle(td.tok.vocab_size, td.audio_dim, memory), td, 8, 0, cpu)
        assert abs(oracle["lm_gap"]) < 1e-6 and all(oracle[f"diff_gap@{t}"] > 0.1 for t in (0.3, 0.6, 0.9)), oracle
        assert all(oracle[f"place_gap@{t}"] > 0.1 if place else abs(oracle[f"place_gap@{t}"]) < 1e-6
                   for t in (0.3, 0.6, 0.9)), oracle
    sct = SCT(SCTConfig(vocab_size=td.tok.vocab_size, audio_dim=td.audio_dim, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_generation_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=32, query_pre_attn_scalar=32, attn_implementation="sdpa", attn_logit_softcapping=None))
    docs = [train.plan_document([(c.turns[0].instruction, scene_to_json(c.turns[0].scene))], td.tok) for c in convs]
    opt = torch.optim.Adam(sct.parameters(), 3e-3)
    for step in range(200):
        ex = docs[step % len(docs)]
        opt.zero_grad()
        h_text, _ = sct(ex.ids[None])
        torch.nn.functional.cross_entropy(sct.lm_logits(h_text[0]), ex.labels, ignore_index=-100).backward()
        opt.step()
    gaps = train.conditioning_gaps(sct.eval(), td, 8, 0, cpu)
    assert gaps["lm_gap"] > 0.3, gaps


def test_every_eval_keeps_the_conditioning_gaps_for_the_curves(single_run, capsys):
    """Each held-out eval of an SCT stage logs the gaps, keeps them in the stage's checkpoint, and bench/curves.py
    reads them back in step order."""
    sys.path.insert(0, str(ROOT / "bench"))
    from curves import read_evals
    rows = read_evals(single_run)
    assert rows and [r["at"] for r in rows] == sorted(r["at"] for r in rows) and rows[-1]["stage"] == "sct1"
    assert all(math.isfinite(r[k]) for r in rows
               for k in ("lm_plan", "lm_gap", "diff_gap@0.3", "diff_gap@0.9", "place_gap@0.9"))


def test_curves_measures_the_gaps_of_a_finished_model_as_its_evals_did(toy, single_run, tmp_path):
    """bench/curves.py --measure: the gaps of a folder's sct.pt now (a model trained before a gap was logged), as the
    stage's last eval computed them on the same weights, and at t = 0.99 too."""
    sys.path.insert(0, str(ROOT / "bench"))
    import curves
    for name in ("tokenizer.model", "sct1.pt"):
        shutil.copy(single_run / name, tmp_path / name.replace("sct1", "sct"))
    gaps = curves.main(["--ckpt-dir", str(tmp_path), "--measure", str(single_run / "latents"), "--data", str(toy[0])])
    last = curves.read_evals(single_run)[-1]
    assert last["step"] == torch.load(single_run / "sct1.pt", weights_only=True)["step"]
    shared = [k for k in last if "gap" in k or k == "lm_plan"]
    assert len(shared) == 8 and all(abs(gaps[0][k] - last[k]) < 1e-4 for k in shared), (gaps, last)
    assert math.isfinite(gaps[0]["place_gap@0.99"]) and math.isfinite(gaps[0]["diff_gap@0.99"])
