"""End to end: every sample.py mode through the command line, on a tiny model overfit inside the test.

The world: one three-turn conversation (a story, then a pan edit, then a volume edit) with 0.63 s
scenes, written as a copilot eval split. A toy tokenizer is trained on its text, a tiny random VAE
encodes its audio, and a tiny SCT is overfit with the Transfusion Forcing loss on the layouts sample.py
builds (multi-turn story, edit of an uploaded clip, description) until greedy decoding reproduces every
model text. The checkpoints are saved in the contract format; `python sample.py ...` then runs on them.
"""
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import soundfile as sf
import torch

import metrics
from copilot import caption_of, parse_scene, read_conversations, scene_to_json, validate_scene
from diffusion import add_noise, sample_span_times, span_loss_mask, span_to_tokens, transfusion_loss
from model import SCT, SCTConfig
from tokenizer import (DESCRIBE, SAMPLE_RATE, StereoVAE, TextTokenizer, Turn, VAEConfig, encode_conversation,
                       load_audio, save_audio, task_turns, train_text_tokenizer)

REPO = Path(__file__).resolve().parents[1]
TINY_VAE = VAEConfig(latent_dim=4, encoder_dim=4, decoder_dim=16, strides=(4, 5, 6, 10), dilations=(1,))
INSTRUCTIONS = ["Rain on a tin roof, and a dog barking on the left.", "Move the dog to the right.",
                "Make the rain louder."]


def _scene(rain_db: float, dog_pan: float, changed: list[int]) -> str:
    sounds = [dict(tool="sfx", text="rain on a tin roof", loudness=rain_db, panning=0, start_time=0, duration=0.63,
                   id=0),
              dict(tool="sfx", text="a dog barking", loudness=-15, panning=dog_pan, start_time=0.1, duration=0.4, id=1)]
    obj = dict(description="Rain on a roof with a dog barking.", added=[], changed=changed, removed=[], text=sounds)
    return scene_to_json(parse_scene(json.dumps(obj)))


SCENES = [_scene(-25, -0.6, []), _scene(-25, 0.6, [1]), _scene(-18, 0.6, [0])]   # story, pan edit, volume edit
CAPTION = scene_to_json(caption_of(parse_scene(SCENES[0])))


def write_eval_split(root: Path) -> None:
    """The conversation as copilot.py writes an eval split (root/eval/<shard>/<id>.json + one FLAC per turn)."""
    folder = root / "eval" / "00000"
    g = torch.Generator().manual_seed(0)
    turns = []
    for k, (instruction, kind, scene) in enumerate(zip(INSTRUCTIONS, ("story", "pan", "volume"), SCENES)):
        save_audio(folder / f"eval-0000000-t{k}.flac", 0.1 * torch.randn(2, round(0.63 * SAMPLE_RATE), generator=g))
        turns.append({"instruction": instruction, "kind": kind, "scene": scene, "audio": f"eval-0000000-t{k}.flac",
                      "activity": {"0": [[0.0, 0.63]], "1": [[0.1, 0.5]]}, "limited_db": 0.0, "level_error": 0.0,
                      "violations": []})
    (folder / "eval-0000000.json").write_text(json.dumps({"id": "eval-0000000", "seed_text": "rain", "turns": turns}))


def training_row(examples, audio_dim: int, gen: torch.Generator) -> dict:
    """Examples packed in one row (doc ids keep them apart), each audio span noised at its own time (Eq. 11)."""
    parts = []
    for i, ex in enumerate(examples):
        t_span = sample_span_times(ex.span_is_model, gen)
        t = span_to_tokens(t_span, ex.span_ids)                                      # [T]
        x_t, v = add_noise(ex.latents, t[ex.audio_mask], torch.randn(ex.latents.shape, generator=gen))
        audio = torch.zeros(len(ex.ids), audio_dim)
        audio[ex.audio_mask] = x_t
        weight = span_to_tokens(span_loss_mask(t_span, ex.span_is_model).float(), ex.span_ids)[ex.audio_mask]
        parts.append(dict(ids=ex.ids, labels=ex.labels, span=ex.span_ids, doc=torch.full_like(ex.ids, i), audio=audio,
                          t=t, v=v, weight=weight))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def reproduces(sct: SCT, tok: TextTokenizer, conversations: list[list[Turn]]) -> bool:
    """Greedy decoding after every user turn gives that conversation's next model text exactly."""
    for turns in conversations:
        for k in range(0, len(turns), 2):
            ex = encode_conversation(turns[:k + 1], tok, generation_prompt=True, audio_dim=sct.config.audio_dim)
            new = sct.generate([ex.ids], [ex.latents], [ex.span_ids], 200, (tok.audio_start_id, tok.end_of_turn_id))[0]
            if tok.decode(new[:-1].tolist()) != "\n".join(p for p in turns[k + 1].parts if isinstance(p, str)):
                return False
    return True


def fit_sct(tok: TextTokenizer, conversations: list[list[Turn]], audio_dim: int, max_steps: int = 500) -> SCT:
    """Overfit a tiny SCT with the Transfusion Forcing loss until it reproduces every model text (checked every 25
    steps)."""
    torch.manual_seed(0)
    cfg = SCTConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_generation_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                    query_pre_attn_scalar=32, sliding_window=None, attn_logit_softcapping=None, audio_dim=audio_dim,
                    max_position_embeddings=1024, attn_implementation="sdpa")
    sct = SCT(cfg)
    opt = torch.optim.AdamW(sct.parameters(), lr=5e-3, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    examples, gen = [encode_conversation(c, tok) for c in conversations], torch.Generator().manual_seed(0)
    for step in range(1, max_steps + 1):
        b = training_row(examples, audio_dim, gen)
        mask, lm = b["span"] > 0, b["labels"] != -100
        h_text, h_audio = sct(b["ids"][None], b["audio"][None], mask[None], b["t"][None], b["span"][None],
                              b["doc"][None])
        loss, _, _ = transfusion_loss(sct.lm_logits(h_text[0, lm]), b["labels"][lm], sct.velocity(h_audio[0, mask]),
                                      b["v"], b["weight"], loss_weight=0.5)   # light diffusion weight: text matters
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        warmup.step()
        if step % 25 == 0 and step >= 100 and reproduces(sct, tok, conversations):
            return sct
    raise AssertionError(f"the tiny SCT did not reproduce its training texts in {max_steps} steps")


def save_checkpoints(folder: Path, vae: StereoVAE, sct: SCT, **trained_with) -> None:
    """vae.pt and sct.pt with the keys train.py writes (tokenizer.model is already in `folder`)."""
    torch.save({"kind": "vae", "config": asdict(vae.config), "model": vae.state_dict()}, folder / "vae.pt")
    sha = lambda name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
    record = {"tokenizer_vocab_size": TextTokenizer(folder / "tokenizer.model").vocab_size,
              "tokenizer_sha256": sha("tokenizer.model"), "vae_sha256": sha("vae.pt"), "vae_audio_dim": vae.audio_dim}
    torch.save({"kind": "sct", "config": asdict(sct.config), "model": sct.state_dict(),
                "train_config": {"sct": {"seq_len": sct.config.max_position_embeddings}},
                "trained_with": {**record, **trained_with}}, folder / "sct.pt")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # a loaded 2-core machine runs tiny models many times faster on one thread
    root = tmp_path_factory.mktemp("world")
    write_eval_split(root / "data")
    conv = read_conversations(root / "data", "eval")[0]
    ckpt = root / "ckpt"
    tok = train_text_tokenizer(INSTRUCTIONS + SCENES + [DESCRIBE, "user", "model"], ckpt / "tokenizer.model", 900)
    torch.manual_seed(0)
    vae = StereoVAE(TINY_VAE).eval()
    with torch.no_grad():
        audio = [load_audio(t.audio) for t in conv.turns]
        vae.fit_latent_stats(a[None] for a in audio)
        z = [vae.encode(a[None])[0] for a in audio]
    sct = fit_sct(tok, [    # the layouts train.py trains on and sample.py asks in: tokenizer.task_turns
        [t for k in range(3) for t in task_turns("story", instruction=INSTRUCTIONS[k], plan=SCENES[k], audio=z[k])],
        task_turns("upload_edit", clip=z[0], instruction=INSTRUCTIONS[1], caption=CAPTION, plan=SCENES[1], audio=z[1]),
        task_turns("understand", clip=z[0], request=DESCRIBE, caption=CAPTION)], vae.audio_dim)
    save_checkpoints(ckpt, vae, sct)
    torch.set_num_threads(threads)
    return {"root": root, "ckpt": ckpt, "data": root / "data", "clip": conv.turns[0].audio}


def run(world, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    """python sample.py ARGS on the tiny checkpoints, 3 diffusion steps, one thread."""
    cmd = [sys.executable, str(REPO / "sample.py"), "--ckpt-dir", str(world["ckpt"]), "--steps", "3", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, cwd=world["root"], timeout=120)


def check_audio(wav: Path, scene_json: str) -> None:
    """48 kHz stereo, exactly as long as the plan's latest end time."""
    info = sf.info(str(wav))
    want = round(parse_scene(scene_json).duration * SAMPLE_RATE)
    assert (info.samplerate, info.channels, info.frames) == (SAMPLE_RATE, 2, want), \
        f"{wav.name}: got {info.samplerate} Hz, {info.channels} ch, {info.frames} samples; " \
        f"expected 48000 Hz, 2 ch, {want}"


def plan_of(path: Path) -> str:
    """A plan file sample.py wrote, as canonical JSON (the file must parse and validate on its own)."""
    return scene_to_json(parse_scene(path.read_text()))


def test_storytelling_writes_plan_and_audio_deterministically(world, tmp_path):
    runs = {name: run(world, "--prompt", INSTRUCTIONS[0], "--seed", seed, "--out", tmp_path / f"{name}.wav")
            for name, seed in (("a", 1), ("b", 1), ("c", 2))}
    for name, r in runs.items():
        assert r.returncode == 0, f"run {name} failed:\n{r.stderr}"
        planned = plan_of(tmp_path / f"{name}.json")
        assert planned == SCENES[0], f"run {name} planned {planned}"
        check_audio(tmp_path / f"{name}.wav", SCENES[0])
    assert "plan:" in runs["a"].stdout and '"a dog barking"' in runs["a"].stdout, \
        f"the plan is not printed:\n{runs['a'].stdout}"
    a, b, c = (sf.read(str(tmp_path / f"{n}.wav"), dtype="float32")[0] for n in "abc")   # the WAV header holds a time
    assert (a == b).all(), "the same seed gave different audio"
    assert not (a == c).all(), "seeds 1 and 2 gave identical audio"


def test_edit_uploaded_clip_writes_caption_plan_and_audio(world, tmp_path):
    r = run(world, "--audio", world["clip"], "--prompt", INSTRUCTIONS[1], "--out", tmp_path / "edit.wav")
    assert r.returncode == 0, r.stderr
    assert plan_of(tmp_path / "edit.caption.json") == CAPTION
    assert plan_of(tmp_path / "edit.json") == SCENES[1]
    assert validate_scene(parse_scene(SCENES[1]), parse_scene(CAPTION)) == [], "the edit must be valid vs the caption"
    check_audio(tmp_path / "edit.wav", SCENES[1])


def test_describe_writes_caption_json_only(world, tmp_path):
    r = run(world, "--audio", world["clip"], "--out", tmp_path / "caption.json")
    assert r.returncode == 0, r.stderr
    assert plan_of(tmp_path / "caption.json") == CAPTION
    assert json.loads((tmp_path / "caption.json").read_text())["added"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caption.json"], "understanding must not write audio"


def test_chat_carries_plans_forward_undoes_and_loads(world, tmp_path):
    script = "\n".join([INSTRUCTIONS[0], INSTRUCTIONS[1], "/undo", INSTRUCTIONS[1], INSTRUCTIONS[2], "/quit",
                        "ignored"])
    r = run(world, "--chat", "--out", tmp_path / "chat", stdin=script)
    assert r.returncode == 0, r.stderr
    assert "removed turn 1" in r.stderr, r.stderr
    for k in range(3):
        assert plan_of(tmp_path / "chat" / f"turn{k}.json") == SCENES[k], f"turn {k}: {r.stderr}"
        check_audio(tmp_path / "chat" / f"turn{k}.wav", SCENES[k])
    assert not (tmp_path / "chat" / "turn3.wav").exists(), "text after /quit was treated as a turn"
    r = run(world, "--chat", "--out", tmp_path / "load", stdin=f"/load {world['clip']}\n{INSTRUCTIONS[1]}\n")
    assert r.returncode == 0, r.stderr
    assert plan_of(tmp_path / "load" / "turn0.caption.json") == CAPTION
    assert plan_of(tmp_path / "load" / "turn0.json") == SCENES[1]


def test_plan_file_is_repaired_reported_and_rendered(world, tmp_path):
    plan = json.loads(SCENES[0])
    plan["text"][1].update(loudness=-40, duration=0.51)           # too quiet; now ends at 0.61 s < 0.63 s
    (tmp_path / "mine.json").write_text(json.dumps(plan))
    r = run(world, "--plan", tmp_path / "mine.json", "--out", tmp_path / "mine.wav")
    assert r.returncode == 0, r.stderr
    assert "loudness -40.0 -> -30.0" in r.stderr, f"the repair is not reported:\n{r.stderr}"
    written = json.loads((tmp_path / "mine.json").read_text())
    assert written["text"][1]["loudness"] == -30 and validate_scene(parse_scene(json.dumps(written))) == []
    check_audio(tmp_path / "mine.wav", json.dumps(written))


def test_eval_writes_the_layout_metrics_reads(world, tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "eval_split.py"), "--ckpt-dir", str(world["ckpt"]), "--steps", "3",
           "--data", str(world["data"]), "--out", str(tmp_path / "sys")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "sys" / "eval-0000000"
    for k, scene in enumerate(SCENES):                            # turn k given the reference turns before it
        record = json.loads((out / f"turn{k}.json").read_text())
        assert scene_to_json(parse_scene(json.dumps(record["plan"]))) == scene, f"turn {k}: {record}"
        assert record["seconds"] > 0
        check_audio(out / f"turn{k}.wav", scene)
    assert scene_to_json(parse_scene(json.dumps(json.loads((out / "caption.json").read_text())["scene"]))) == CAPTION
    conversations = read_conversations(world["data"], "eval")
    results = metrics.evaluate(conversations, lambda audio, caps: torch.full((len(caps), 4), 0.5),
                               lambda audio: torch.stack([audio.abs().mean(), audio.std()]), tmp_path / "sys")
    editing, story = results["editing"]["all"], results["storytelling"]["all"]
    assert editing["System"]["n"] == 2 and story["System"]["multiflam"] == 0.5, results


def test_kill_9_soak_short(tmp_path):
    """bench/soak.py, short: train.py's VAE stage, an SCT stage and copilot.py --out each killed twice with SIGKILL
    at random points and resumed end as an uninterrupted run does: the same files (no temporary or stray file), no
    corrupt file at any kill point, bit-identical weights, identical dataset bytes."""
    cmd = [sys.executable, str(REPO / "bench" / "soak.py"), "--kills", "2", "--conversations", "4", "--vae-steps", "12",
           "--sct-steps", "6", "--seed", "1", "--work", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    results = {line.split(":")[0]: line for line in r.stdout.splitlines()}
    assert sorted(results) == ["copilot", "sct", "vae"] and all(": PASS {" in v for v in results.values()), r.stdout
