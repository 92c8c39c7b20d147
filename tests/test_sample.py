"""Tests for sample.py's parts, in process: the invalid-plan policy, the layouts of the prefixes, cached CFG
sampling against a full-sequence reference, input and checkpoint checks, chat context trimming, and the resume of
bench/eval_split.py, which answers an eval split with these functions.
The command line itself is driven end to end in tests/test_end_to_end.py."""
import json
import shutil
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import sample
from copilot import parse_scene, read_conversations, scene_to_json, validate_scene
from diffusion import DiffusionConfig, guided
from diffusion import sample as diffusion_sample
from metrics import SmallFLAM
from model import SCT, SCTConfig
from test_end_to_end import CAPTION, INSTRUCTIONS, SCENES, TINY_VAE, save_checkpoints, write_eval_split
from tokenizer import (SAMPLE_RATE, CheckpointError, StereoVAE, Turn, encode_conversation, load_model, save_audio,
                       task_turns, train_text_tokenizer)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import eval_split  # noqa: E402  (bench/eval_split.py: the eval split in metrics.py's layout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Random tiny checkpoints in the contract format (nothing trained but the tokenizer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("ckpt")
    tok = train_text_tokenizer(INSTRUCTIONS + SCENES + [sample.DESCRIBE, "user", "model"], d / "tokenizer.model", 600)
    torch.manual_seed(0)
    vae = StereoVAE(TINY_VAE).eval()
    sct = SCT(SCTConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_generation_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                        query_pre_attn_scalar=16, sliding_window=None, attn_logit_softcapping=None,
                        audio_dim=vae.audio_dim, max_position_embeddings=512, attn_implementation="sdpa"))
    with torch.no_grad():
        sct.diffusion_head.weight.normal_(0, 0.1)          # a non-zero velocity, so sampling depends on the model
    save_checkpoints(d, vae, sct)
    yield d
    torch.set_num_threads(threads)


@pytest.fixture
def m(tiny):
    return sample.load_models(tiny)


# -----------------------------------------------------------------------------
# The invalid-plan policy

def test_valid_plan_is_accepted_unchanged():
    got = sample.accept_plan("the model said: " + SCENES[1], parse_scene(SCENES[0]))
    assert got.valid and got.notes == [] and scene_to_json(got.scene) == SCENES[1]


def test_repair_clamps_numbers_and_sets_edit_lists_to_the_real_difference():
    bad = json.loads(SCENES[0])
    bad["text"][0]["duration"] = 9
    bad["text"][1].update(loudness=-45, panning=1.5, start_time=5, duration=6)
    bad["added"], bad["changed"] = [7], []
    got = sample.accept_plan(json.dumps(bad), parse_scene(SCENES[0]))
    rain, dog = got.scene.by_id()[0], got.scene.by_id()[1]
    # clamped into [-30, -10] dB, [-1, 1], [0, 4] s, and the duration so that the end is 8 s: 8 - 4 = 4
    assert (dog.loudness, dog.panning, dog.start_time, dog.duration, rain.duration) == (-30, 1, 4, 4, 8)
    assert (got.scene.added, got.scene.changed, got.scene.removed) == ([], [0, 1], []), "edit lists not recomputed"
    assert not got.valid and validate_scene(got.scene, parse_scene(SCENES[0])) == []
    for text in ("loudness -45.0 -> -30.0", "panning 1.5 -> 1.0", "start_time 5.0 -> 4.0", "duration 6.0 -> 4.0",
                 "duration 9.0 -> 8.0", "added [7] -> []", "changed [] -> [0, 1]"):
        assert any(text in n for n in got.notes), f"repair {text!r} not reported in {got.notes}"


def test_violation_without_repair_is_reported_and_kept():
    scene = json.loads(SCENES[0])
    scene["text"][0]["panning"] = 0.5                             # the rain is no longer a centred ambience
    got = sample.accept_plan(json.dumps(scene), None)
    assert not got.valid and scene_to_json(got.scene) == scene_to_json(parse_scene(json.dumps(scene)))
    assert any(n.startswith("plan left as written: scene: no ambience") for n in got.notes), got.notes


def test_unreadable_plan_is_an_error_with_the_raw_text():
    with pytest.raises(sample.SampleError, match=r'(?s)not a scene.*raw text was:\n\{"description": "rain"'):
        sample.accept_plan('{"description": "rain", "text": [', None)


# -----------------------------------------------------------------------------
# Layouts and sampling

def test_prefixes_follow_the_training_layout(m):
    z_in, z_out = torch.randn(5, m.sct.config.audio_dim), torch.zeros(3, m.sct.config.audio_dim)
    user = Turn("user", [z_in, INSTRUCTIONS[1]])
    trained = encode_conversation([user, Turn("model", [CAPTION, SCENES[1], z_out])], m.tok)
    prompt = encode_conversation([user], m.tok, generation_prompt=True)
    ids, latents, spans = sample._span_prefix(m, [user, Turn("model", [CAPTION, SCENES[1], z_out])])
    # what decoding sees, then the canonical caption and plan it wrote, then <unused0>: the training sequence
    decoded = prompt.ids.tolist() + m.tok.encode(CAPTION + "\n" + SCENES[1]) + [m.tok.audio_start_id]
    assert ids.tolist() == decoded == trained.ids[: len(decoded)].tolist()
    assert trained.span_ids[len(decoded)] == 2 and torch.equal(latents, z_in) and spans.max() == 1
    uncond = sample._span_prefix(m, [Turn("model", [z_out])])[0].tolist()
    t = m.tok
    assert uncond == [t.bos_id, t.start_of_turn_id, *t.encode("model\n"), t.audio_start_id]


def test_cached_cfg_sampling_equals_full_sequence_reference(m):
    """sample_latents (prefix cache, cond + uncond batched) against CFG written out with SCT.forward over whole
    sequences."""
    D, F, w = m.sct.config.audio_dim, 6, 2.5
    scene = parse_scene(SCENES[0])
    scene.sounds = [s for s in scene.sounds if s.id == 0]
    scene.sounds[0].duration = F / 40
    user = Turn("user", [torch.randn(4, D), INSTRUCTIONS[1]])
    texts = [CAPTION, scene_to_json(scene)]
    seqs = [encode_conversation(turns, m.tok) for turns in
            ([user, Turn("model", texts + [torch.zeros(F, D)])], [Turn("model", [torch.zeros(F, D)])])]

    def v_both(x, t):                                              # x [2, F, D], t [2]: cond row, uncond row
        out = []
        for row, time, ex in zip(x, t, seqs):
            span = ex.span_ids == ex.span_ids.max()
            audio = torch.zeros(len(ex.ids), D)
            audio[ex.audio_mask] = torch.cat([ex.latents[:-F], row])
            h = m.sct(ex.ids[None], audio[None], ex.audio_mask[None], (span * time)[None], ex.span_ids[None])[1]
            out.append(m.sct.velocity(h[0, span]))
        return torch.stack(out)

    with torch.no_grad():
        want = diffusion_sample(guided(v_both, w), (1, F, D), DiffusionConfig(steps=4),
                                torch.Generator().manual_seed(3))[0]
        got = sample.sample_latents(m, [user, Turn("model", texts + [torch.zeros(F, D)])],
                                    sample.Options(steps=4, cfg=w), torch.Generator().manual_seed(3))
    assert got.shape == (F, D)
    assert torch.allclose(got, want, atol=1e-4), f"max difference {(got - want).abs().max():.2e}"


def test_edit_reply_puts_canonical_text_in_context_and_reports_a_missing_audio_start(m, monkeypatch):
    spaced = json.dumps(json.loads(SCENES[1]))                     # what a model might write: valid, not canonical
    monkeypatch.setattr(sample, "decode_text", lambda *a: (f"{CAPTION}\n{spaced}", m.tok.end_of_turn_id))
    used = []
    real = sample.sample_latents
    monkeypatch.setattr(sample, "sample_latents", lambda m_, turns, *a: used.append(turns[-1].parts[:-1]) or
                        real(m_, turns, *a))
    user = {"clip": torch.randn(4, m.vae.audio_dim), "instruction": INSTRUCTIONS[1]}
    reply = sample.respond(m, [], "upload_edit", user, None, sample.Options(steps=2), torch.Generator().manual_seed(0))
    texts = [reply.parts["caption"], reply.parts["plan"]]
    assert used == [[CAPTION, SCENES[1]]] and texts == [CAPTION, SCENES[1]], "the raw text reached the context"
    assert any("without starting the audio" in n for n in reply.notes), reply.notes
    assert reply.latents.shape == (26, m.vae.audio_dim) and reply.audio.shape == (2, round(0.63 * SAMPLE_RATE))
    assert task_turns("upload_edit", **user, **reply.parts)[1].parts[:2] == [CAPTION, SCENES[1]]


def test_an_empty_model_turn_is_an_error_that_says_what_to_ask(m, monkeypatch):
    monkeypatch.setattr(sample, "decode_text", lambda *a: (" \n", m.tok.audio_start_id))
    for task, user in (("story", {"instruction": "A storm."}), ("understand", {"clip": torch.randn(4, 8),
                                                                                "request": "describe"})):
        with pytest.raises(sample.SampleError, match="without writing anything.*name the ones you want"):
            sample.respond(m, [], task, user, None, sample.Options(steps=2), torch.Generator())


def test_context_longer_than_the_trained_length_is_refused(m):
    m.max_len = 40
    with pytest.raises(sample.ContextFull, match="trained on at most 40"):
        sample.decode_text(m, [Turn("user", [SCENES[0]])], 10)


# -----------------------------------------------------------------------------
# Inputs and checkpoints

def test_audio_longer_than_8_s_is_refused_unless_trimmed(m, tmp_path):
    save_audio(tmp_path / "long.wav", torch.zeros(2, int(8.5 * SAMPLE_RATE)))
    with pytest.raises(sample.SampleError, match=r"8.50 s of audio.*at most 8 s.*--trim"):
        sample.read_audio(tmp_path / "long.wav")
    z = m.encode(sample.read_audio(tmp_path / "long.wav", trim=True))
    assert z.shape == (8 * m.vae.config.frame_rate, m.vae.audio_dim)


def exit_code(argv: list) -> int:
    try:
        return sample.main([str(a) for a in argv])
    except SystemExit as e:                                        # argparse: a flag refused
        return e.code


def test_bad_input_is_refused_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    """Every flag, input file and --out is checked before the models load (NaN and infinite numbers too), and an
    --out that cannot be written is refused before generation, not after it."""
    monkeypatch.setattr(sample, "load_models", lambda *a: pytest.fail("the models loaded before the input was checked"))
    (tmp_path / "broken.wav").write_bytes(b"RIFF....not audio")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder.wav").mkdir()
    save_audio(tmp_path / "cut.wav", torch.zeros(2, SAMPLE_RATE))
    (tmp_path / "cut.wav").write_bytes((tmp_path / "cut.wav").read_bytes()[:SAMPLE_RATE])
    sf.write(tmp_path / "1hz.wav", np.zeros((10, 2), dtype=np.float32), 1)
    many = json.loads(SCENES[0])
    many["text"] = [{**many["text"][1], "id": i} for i in range(500)]
    (tmp_path / "many.json").write_text(json.dumps(many))
    cases = {("--prompt", "  "): "--prompt is empty",
             ("--audio", tmp_path / "broken.wav"): "soundfile cannot read it",
             ("--audio", tmp_path / "absent.wav"): "no such audio file",
             ("--audio", tmp_path / "cut.wav"): "cut.wav: truncated: its header promises 1.00 s, the file holds 0.12 s",
             ("--audio", tmp_path / "1hz.wav", "--trim"): "sample rate 1 Hz; accepted rates are 8000 to 384000 Hz",
             ("--plan", tmp_path / "absent.json"): "no such file",
             ("--plan", tmp_path / "many.json"): "the plan has 500 sounds; a scene holds at most 10 sounds",
             ("--prompt", "rain", "--out", tmp_path / "a_file" / "x.wav"): "x.wav: cannot write there",
             ("--prompt", "rain", "--out", tmp_path / "folder.wav"): "cannot write there (",
             ("--chat", "--out", tmp_path / "a_file"): "a_file: cannot write there",
             ("--prompt", "rain", "--cfg", "nan"): "--cfg nan: give a number from 0 to 20",
             ("--prompt", "rain", "--cfg", "inf"): "--cfg inf: give a number from 0 to 20",
             ("--prompt", "rain", "--cfg", "-1"): "--cfg -1.0: give a number from 0 to 20",
             ("--prompt", "rain", "--steps", "0"): "--steps 0: give a number from 1 to 1000",
             ("--prompt", "rain", "--seed", "-3"): "--seed -3: give a number from 0 to",
             ("--prompt", "rain", "--out", tmp_path / "x.mp3"): "the audio is written as WAV or FLAC",
             ("--audio", tmp_path / "cut.wav", "--out", tmp_path / "c.wav"): "a description is JSON; end the path "
                                                                              "with .json"}
    for argv, message in cases.items():
        assert exit_code(["--ckpt-dir", tiny, *argv]) == 2, argv
        assert message in capsys.readouterr().err, f"{argv}: expected {message!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1hz.wav", "a_file", "broken.wav", "cut.wav", "folder.wav",
                                                          "many.json"], "a refused request wrote something"
    for argv in (["--chat", "--prompt", "x"], ["--chat", "--audio", "a.wav"], ["--plan", "p.json", "--audio", "a.wav"],
                 []):
        with pytest.raises(SystemExit):
            sample.parse_args(argv)


def test_bad_checkpoints_and_non_finite_audio(tiny, tmp_path, capsys, monkeypatch):
    """A corrupt, empty or hostile model file: a message naming the file and the fix. NaN audio is never written.
    main() catches this project's errors only: a bug keeps its traceback."""
    for name, data, message in (("vae.pt", b"", "vae.pt is empty (0 bytes)"),
                                ("sct.pt", b"PK\x03\x04 half a zip", "sct.pt is truncated or corrupt")):
        d = tmp_path / name.replace(".", "_")
        shutil.copytree(tiny, d)
        (d / name).write_bytes(data)
        assert sample.main(["--ckpt-dir", str(d), "--prompt", "rain", "--out", str(tmp_path / "x.wav")]) == 2
        err = capsys.readouterr().err
        assert f"{d / message}; restore a good copy, or delete it and run the train.py stage" in err, err
        assert "weights_only" not in err and "Traceback" not in err
    real_decode = StereoVAE.decode
    monkeypatch.setattr(StereoVAE, "decode", lambda self, *a: real_decode(self, *a) * float("nan"))
    monkeypatch.setattr(sample, "decode_text", lambda *a: (SCENES[0], 7))
    argv = ["--ckpt-dir", str(tiny), "--prompt", "rain", "--out", str(tmp_path / "nan.wav"), "--steps", "1"]
    assert sample.main(argv) == 2
    assert "NaN or infinite samples; nothing is written" in capsys.readouterr().err
    assert not (tmp_path / "nan.wav").exists() and not (tmp_path / "nan.json").exists()
    loud = torch.tensor([[2.0], [-0.5]])                            # left +6 dBFS, right -6 dBFS, opposite signs
    monkeypatch.setattr(StereoVAE, "decode", lambda self, *a: real_decode(self, *a) * 0 + loud)
    argv[5] = str(tmp_path / "loud.wav")
    assert sample.main(argv) == 0                                   # too loud: scaled to -0.1 dBFS, and said so
    assert "the audio peaked at +6.0 dBFS; scaled down to -0.1 dBFS" in capsys.readouterr().err
    loud, _ = sf.read(tmp_path / "loud.wav")
    assert abs(loud).max() == pytest.approx(0.99, abs=1e-4) and loud[:, 0] == pytest.approx(-4 * loud[:, 1], abs=1e-4)
    monkeypatch.setattr(sample, "respond", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        sample.main(argv)


def test_checkpoint_set_must_belong_together(tiny, tmp_path):
    def broken(name: str, **meta):
        d = tmp_path / name
        d.mkdir()
        (d / "tokenizer.model").write_bytes((tiny / "tokenizer.model").read_bytes())
        vae, sct = load_model(StereoVAE, tiny / "vae.pt"), load_model(SCT, tiny / "sct.pt")
        save_checkpoints(d, vae, sct, **meta)
        return d

    cases = {broken("vocab", tokenizer_vocab_size=7): "tokenizer_vocab_size: sct.pt was trained with 7",
             broken("hash", tokenizer_sha256="0" * 64): "tokenizer_sha256: sct.pt was trained with 0000",
             broken("vae", vae_sha256="0" * 64): "vae_sha256",
             broken("dim", vae_audio_dim=99): "vae_audio_dim: sct.pt was trained with 99"}
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "tokenizer.model").write_bytes(b"")
    cases[missing] = "lacks vae.pt, sct.pt; train the toy model with `python train.py --preset toy`"
    code = broken("code")
    ckpt = torch.load(code / "sct.pt", weights_only=True)
    ckpt["config"]["rope_scaling"] = 2.0
    torch.save(ckpt, code / "sct.pt")
    cases[code] = "unknown fields ['rope_scaling']"
    corrupt = broken("corrupt")
    (corrupt / "sct.pt").write_bytes(b"not a checkpoint")
    cases[corrupt] = "sct.pt holds no checkpoint"
    for d, message in cases.items():
        with pytest.raises((sample.SampleError, CheckpointError)) as e:
            sample.load_models(d)
        assert message in str(e.value), f"{d.name}: expected {message!r} in {e.value}"


# -----------------------------------------------------------------------------
# Chat context and eval resume

def test_chat_drops_the_oldest_exchange_when_the_context_is_full(m, tmp_path, monkeypatch, capsys):
    seen = []

    def fake_respond(m_, history, task, user, previous, opts, generator, plan=None):
        turns = sample.request(history, task, user)
        seen.append([p for t in turns for p in t.parts if isinstance(p, str)])
        if len(turns) > 3:                                         # room for one exchange of context only
            raise sample.ContextFull("too long")
        scene = parse_scene(SCENES[0])
        return sample.Reply(None, sample.Checked(scene, True, []), torch.zeros(26, 8),
                            torch.zeros(2, round(scene.duration * SAMPLE_RATE)), dict(plan=0, diffusion=0, vae=0), [])

    monkeypatch.setattr(sample, "respond", fake_respond)
    args = Namespace(out=str(tmp_path), seed=0, trim=False, plot=False)
    sample.run_chat(m, args, sample.Options(), lines=INSTRUCTIONS)
    assert seen[-1] == [INSTRUCTIONS[1], SCENES[0], INSTRUCTIONS[2]], f"retry context: {seen[-1]}"
    assert "dropping the oldest exchange" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("*.wav")) == ["turn0.wav", "turn1.wav", "turn2.wav"]


def test_eval_records_unusable_plans_and_resumes(tiny, tmp_path):
    write_eval_split(tmp_path / "data")
    argv = ["--ckpt-dir", str(tiny), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "sys"),
            "--steps", "1", "--max-new-tokens", "8"]
    assert eval_split.main(argv) == 0
    out = tmp_path / "sys" / read_conversations(tmp_path / "data", "eval")[0].id
    for k in range(3):                                             # an untrained model writes no scene
        record = json.loads((out / f"turn{k}.json").read_text())
        assert record["plan"] is None and "not a scene" in record["notes"][0], record
        assert record["seconds"] > 0 and (out / f"turn{k}.wav").is_file()
    assert json.loads((out / "caption.json").read_text())["scene"] is None
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert eval_split.main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps, "finished outputs were computed again"


def test_the_shipped_toy_model_loads_and_plans():
    """checkpoints/toy ships with the repository for the README's first command: it must keep loading with
    this code (configs and weights are checked strictly), and its greedy storytelling plan must parse."""
    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "toy"
    m = sample.load_models(ckpt)
    load_model(SmallFLAM, ckpt / "flam.pt")
    text, stop = sample.decode_text(m, [Turn("user", ["Make an audio scene with steady rain falling."])], 600)
    assert stop == m.tok.audio_start_id, f"the plan should end where its audio starts, got {text!r}"
    assert parse_scene(text).sounds


def test_plot_draws_the_spectrograms_with_the_plan_and_names_matplotlib_when_missing(tmp_path, monkeypatch):
    """--plot: a PNG of both channels' spectrograms with one labelled box per planned sound; without matplotlib a
    clear error that says how to get it (it is an optional extra)."""
    pytest.importorskip("matplotlib")
    scene = parse_scene(SCENES[0])
    audio = torch.randn(2, 2 * SAMPLE_RATE) * 0.1
    sample.plot_scene(tmp_path / "a.png", audio, scene)
    png = (tmp_path / "a.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.pyplot as plt
    drawn = []
    monkeypatch.setattr(plt.Axes, "add_patch", lambda ax, patch: drawn.append(patch))
    sample.plot_scene(tmp_path / "b.png", audio, scene)
    assert len(drawn) == 2 * len(scene.sounds)                       # a box per sound in each channel's picture
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(sample.SampleError, match="--plot needs matplotlib.*pip install matplotlib"):
        sample.plot_scene(tmp_path / "c.png", audio, scene)
