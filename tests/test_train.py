"""Training on the tiny preset: the training-time views match the inference modules, a few steps
lower the loss, the stages run and resume from the command line, fp16 / sharded checkpoints load."""

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

from flowact.state import MemoryBank
from flowact.networks import build_networks
from flowact.presets import LATENT_CHANNELS
from flowact.train import common, forcing, vae
from flowact.train.data import make_clip
from flowact.train.latents import LatentSet, latent_weights, make_bank, memory_chunks, sample_batch


@pytest.fixture(autouse=True)
def one_thread():
    """Small training steps run fastest on one thread (and the stages set one); restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_decode_float_matches_the_decoder(tiny, tiny_nets):
    latents = torch.randn(2, 4, LATENT_CHANNELS, tiny.latent_height, tiny.latent_width)
    with torch.no_grad():
        frames = tiny_nets.vae_decoder(latents)  # (2, 12, H, W, 3) uint8
        rgb = common.decode_float(tiny_nets.vae_decoder, latents)
        some = common.decode_float(tiny_nets.vae_decoder, latents, torch.tensor([[0, 5, 11], [3, 4, 7]]))
    ours = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(ours, frames)
    assert torch.allclose(some[0], rgb[0, [0, 5, 11]], atol=1e-6) and torch.allclose(some[1], rgb[1, [3, 4, 7]], atol=1e-6)


def test_encode_groups_pools_frames(tiny, tiny_nets):
    clip = make_clip(5, tiny.height, 1)
    frames = torch.from_numpy(clip.frames[:8])[None]  # (1, 8, H, W, 3)
    with torch.no_grad():
        z = common.encode_groups(tiny_nets.vae_encoder, frames)
        partial = common.encode_groups(tiny_nets.vae_encoder, frames.float(), grad_frames=1)
        still = common.encode_groups(tiny_nets.vae_encoder, torch.from_numpy(clip.reference)[None, None].repeat(1, 4, 1, 1, 1))
        ref = tiny_nets.vae_encoder(torch.from_numpy(clip.reference)[None])
        single = tiny_nets.vae_encoder(frames[0, :4])
    assert z.shape == (1, 2, LATENT_CHANNELS, tiny.latent_height, tiny.latent_width)
    assert torch.allclose(z[0, 0], single.mean(0), atol=1e-4) and torch.allclose(partial, z, atol=1e-4)
    assert torch.allclose(still[0, 0], ref[0], atol=1e-4)  # a still image encodes like the reference


def test_memory_matches_a_full_stream(tiny):
    """The training memory (only the last L+1 pushes) equals the bank of a stream that pushed every chunk."""
    ref = torch.randn(LATENT_CHANNELS, 8, 8)
    chunks = [torch.randn(3, LATENT_CHANNELS, 8, 8) for _ in range(9)]
    for long_term in (0, 1, 3):
        for k in range(len(chunks)):
            full = MemoryBank(ref, long_term)
            for c in chunks[:k]:
                full.push(c)
            lat, valid = make_bank(ref, [chunks[c] for c in memory_chunks(k, long_term, False)], long_term, False)
            assert torch.equal(lat, full.latents) and torch.equal(valid, full.valid)
            full.push(chunks[k])  # refinement of chunk k: the bank after it, short-term hidden
            lat, valid = make_bank(ref, [chunks[c] for c in memory_chunks(k, long_term, True)], long_term, True)
            assert torch.equal(lat, full.latents) and torch.equal(valid, full.without_short_term())


def tiny_latent_set(tiny, clips=3, chunks=6) -> LatentSet:
    g = torch.Generator().manual_seed(0)
    n = chunks * 3
    return LatentSet(torch.randn(clips, n, LATENT_CHANNELS, tiny.latent_height, tiny.latent_width, generator=g).half(),
                     torch.randn(clips, LATENT_CHANNELS, tiny.latent_height, tiny.latent_width, generator=g),
                     0.1 * torch.randn(clips, chunks * 7680, generator=g), torch.randint(3, (clips, chunks), generator=g),
                     torch.rand(clips, chunks * 12, generator=g))


def test_few_forcing_steps_lower_the_loss(tiny):
    torch.manual_seed(0)
    nets = build_networks(tiny, seed=0)
    for m in nets.modules().values():
        m.train().requires_grad_(True)
    ds = tiny_latent_set(tiny)
    batch = sample_batch(ds, tiny, 8, torch.Generator().manual_seed(1), long_term=3)
    head = torch.nn.Linear(tiny.audio.d_model, 1)
    params = [p for m in (nets.denoiser, nets.audio_encoder, nets.text_encoder, head) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3)
    weights = latent_weights(tiny)
    losses = []
    for step in range(20):
        loss, _ = forcing.forcing_loss(nets, head, batch, torch.Generator().manual_seed(step % 2), weights, 3.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


def test_few_vae_steps_lower_the_loss(tiny):
    nets = build_networks(tiny, seed=0)
    enc, dec = nets.vae_encoder.train().requires_grad_(True), nets.vae_decoder.train().requires_grad_(True)
    clip = make_clip(3, tiny.height, 2)
    win = torch.from_numpy(clip.frames[None, :16])
    refs = torch.from_numpy(clip.reference[None])
    opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=3e-3)
    weights = vae.pixel_weights(tiny)
    losses = []
    for step in range(25):
        loss, _ = vae.vae_loss(enc, dec, win, refs, torch.tensor([False]), weights, torch.Generator().manual_seed(step % 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


def test_stages_run_resume_and_ship(tiny, tmp_path):
    """Every stage's command on a minimal data set, a resumed stage, and the fp16 shipping step."""
    from flowact.train import distill, ship

    out = str(tmp_path / "run")
    small = ["--preset", "tiny", "--out", out, "--batch", "2", "--save-every", "1"]
    vae.main(small + ["--steps", "2", "--clips", "2"])
    forcing.main(small + ["--steps", "1", "--clips", "2", "--chunks", "4"])
    forcing.main(small + ["--steps", "2", "--clips", "2", "--chunks", "4", "--resume"])
    assert json.loads((tmp_path / "run" / "forcing" / "summary.json").read_text())["steps"] == 2
    forcing.main(small + ["--steps", "1", "--clips", "2", "--chunks", "4", "--self-forcing"])
    distill.main(small + ["--steps", "1", "--clips", "2", "--chunks", "4", "--teacher-steps", "3"])
    for stage in ("vae", "forcing", "self_forcing", "distill"):
        assert (tmp_path / "run" / stage / "loss.png").is_file()
    ship.main(["--preset", "tiny", "--out", out, "--dest", str(tmp_path / "ckpt")])
    nets = build_networks(tiny, checkpoint=tmp_path / "ckpt" / "tiny")
    direct = build_networks(tiny, checkpoint=tmp_path / "run" / "distill" / "checkpoint")
    for a, b in zip(nets.denoiser.state_dict().values(), direct.denoiser.state_dict().values()):
        assert torch.allclose(a, b.half().float())


def test_sharded_checkpoint_roundtrip(tiny, tiny_nets, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "SHARD_BYTES", 100_000)
    sizes = common.save_networks(tiny_nets, tmp_path, dtype=torch.float16)
    assert any("-of-" in name for name in sizes)
    loaded = build_networks(tiny, checkpoint=tmp_path)
    for a, b in zip(loaded.denoiser.state_dict().values(), tiny_nets.denoiser.state_dict().values()):
        assert a.dtype == torch.float32 and torch.allclose(a, b.half().float())
    with pytest.raises(ValueError, match="different preset"):
        build_networks(tiny.with_(dim=32, heads=2), checkpoint=tmp_path)


def test_clips_render_the_same_in_worker_processes():
    from flowact.train.data import make_clips

    serial = make_clips([11, 12, 13], 64, 1)
    parallel = make_clips([11, 12, 13], 64, 1, workers=2)
    for a, b in zip(serial, parallel):
        assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio) and a.states == b.states


def test_espeak_bank_replaces_espeak_ng(tmp_path, monkeypatch):
    """A phrase bank written where espeak-ng exists is all a machine without it needs."""
    from flowact.train import data, speech

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    bank = tmp_path / "bank.npz"
    speech.write_espeak_bank(bank, 3)
    monkeypatch.setenv(speech.ESPEAK_BANK_ENV, str(bank))
    monkeypatch.setattr(speech, "_espeak_bank", None)
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)  # as on a machine without espeak-ng
    assert speech.espeak_available()
    phrases = speech.espeak_bank()
    assert len(phrases) == 3 and all(np.abs(p).max() == pytest.approx(1.0, abs=1e-4) for p in phrases)
    assert any(np.array_equal(speech.espeak_phrase(np.random.default_rng(0)), p) for p in phrases)
    audio, _ = data.speech_timeline(np.random.default_rng(1), 6.0, "espeak", start_silent=False)
    assert np.abs(audio).max() > 0.01


def test_time_bound_moves_the_learning_rate_schedule(tmp_path):
    stage = common.Stage(tmp_path, "x")
    args = argparse.Namespace(steps=1000, minutes=2.0)
    stage.step, stage.seconds_before = 10, 60.0  # half the time budget spent after 10 steps
    assert stage.schedule_step(args) >= 500
    assert common.Stage(tmp_path, "y").schedule_step(argparse.Namespace(steps=1000, minutes=None)) == 0


def test_recipe_rejects_unknown_stages():
    from flowact.train import recipe

    with pytest.raises(SystemExit):
        recipe.main(["--preset", "cpu", "--stages", "vae,nonsense"])
