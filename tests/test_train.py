"""Tests for train.py (VAE stage): checkpoints are atomic, training resumes exactly, bad data fails clearly."""
import argparse

import numpy as np
import pytest
import soundfile as sf
import torch

import train
from tokenizer import SAMPLE_RATE, VAE_PRESETS, AudioError, StereoVAE, VAEConfig

TINY = VAEConfig(latent_dim=4, encoder_dim=2, decoder_dim=16, strides=(4, 5, 6, 10), dilations=(1,),
                 stft_ffts=(256,), mel_windows=(256,), mel_bins=(20,), gan=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(VAE_PRESETS, "toy", TINY)
    monkeypatch.setitem(train.VAE_TRAIN_PRESETS, "toy", train.VAETrainConfig(
        steps=4, batch_size=2, crop_seconds=0.05, lr=1e-3, warmup_steps=1, heldout_fraction=0.5,
        eval_seconds=0.1, stats_crops=8))


def write_scenes(folder, n=4):
    folder.mkdir()
    t = np.arange(SAMPLE_RATE // 4) / SAMPLE_RATE
    for i in range(n):
        tone = 0.3 * np.sin(2 * np.pi * (300 + 100 * i) * t)
        sf.write(folder / f"s{i}.wav", np.stack([tone, 0.5 * tone], 1).astype(np.float32), SAMPLE_RATE)
    sf.write(folder / "mono.flac", (0.1 * np.sin(2 * np.pi * 500 * t)).astype(np.float32), SAMPLE_RATE)


def args_for(data, out, **kw):
    base = dict(preset="toy", data=data, out=out, steps=None, batch_size=None, no_gan=False, log_every=2,
                eval_every=2, save_every=2, seed=0)
    return argparse.Namespace(**{**base, **kw})


def test_resume_continues_exactly(tmp_path, tiny_preset, monkeypatch):
    write_scenes(tmp_path / "data")
    straight = train.train_vae(args_for(tmp_path / "data", tmp_path / "a"))
    calls = {"n": 0}
    real_loss = train.vae_loss

    def crash_on_third_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash after the step-2 checkpoint")
        return real_loss(*a, **k)

    monkeypatch.setattr(train, "vae_loss", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        train.train_vae(args_for(tmp_path / "data", tmp_path / "b"))
    assert torch.load(tmp_path / "b" / "vae.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(train, "vae_loss", real_loss)
    resumed = train.train_vae(args_for(tmp_path / "data", tmp_path / "b"))
    a, b = (torch.load(p, weights_only=True) for p in (straight, resumed))
    assert a["step"] == b["step"] == 4 and a["done"] and b["done"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"{key} differs after resuming"
    vae = StereoVAE.from_checkpoint(resumed)
    assert not torch.equal(vae.latent_scale, torch.ones(vae.audio_dim)), "normalisation must be fitted at the end"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["vae.pt"], "no temporary files left"


def test_finished_stage_is_skipped(tmp_path, tiny_preset, capsys):
    write_scenes(tmp_path / "data")
    path = train.train_vae(args_for(tmp_path / "data", tmp_path / "out"))
    before = path.stat().st_mtime_ns
    train.train_vae(args_for(tmp_path / "data", tmp_path / "out"))
    assert "skipping" in capsys.readouterr().out and path.stat().st_mtime_ns == before


def test_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        train.find_audio(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .wav or .flac"):
        train.find_audio(tmp_path / "empty")
    (tmp_path / "six").mkdir()
    sf.write(tmp_path / "six" / "x.wav", np.zeros((10, 6), dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="6 channels"):
        train.find_audio(tmp_path / "six")


def test_crops_and_schedule(tmp_path):
    write_scenes(tmp_path / "data", n=2)
    files = train.find_audio(tmp_path / "data")
    batch = train.crop_batch(files, 6, SAMPLE_RATE // 2, torch.Generator().manual_seed(0))   # longer than files
    assert batch.shape == (6, 2, SAMPLE_RATE // 2) and (batch[:, :, SAMPLE_RATE // 4:] == 0).all()
    tc = train.VAETrainConfig(steps=100, warmup_steps=10, lr=1.0)
    lrs = [train.lr_at(s, tc, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])), "cosine decay must not increase"


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
