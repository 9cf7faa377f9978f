"""The model family and the per-stream engine, in process, on the tiny preset."""

import numpy as np
import pytest
import torch

from conftest import ref_image, run_session, speech_chunks
from flowact.engine import Engines, InputError, MemoryBank, StreamSession, step_batch
from flowact.media import read_mp4
from flowact.models.text_encoder import tokenize
from flowact.networks import build_networks
from flowact.presets import (AUDIO_FEATURES_PER_CHUNK, FRAMES_PER_CHUNK, LATENT_CHANNELS, PRESETS,
                             SAMPLES_PER_CHUNK, get_preset)


def denoiser_inputs(preset, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = (preset.latent_height, preset.latent_width)
    x = torch.randn(batch, 3, LATENT_CHANNELS, *lat, generator=g)
    t = torch.rand(batch, 3, generator=g)
    audio = torch.randn(batch, AUDIO_FEATURES_PER_CHUNK, preset.audio.d_model, generator=g)
    prompt = torch.randn(batch, preset.prompt_tokens, preset.text_dim, generator=g)
    memory = torch.randn(batch, preset.memory_frames, LATENT_CHANNELS, *lat, generator=g)
    valid = torch.ones(batch, preset.memory_frames, dtype=torch.bool)
    valid[0, 1:1 + preset.long_term_size] = False  # stream 0: long-term memory still empty
    return x, t, audio, prompt, memory, valid


def test_presets_geometry():
    assert SAMPLES_PER_CHUNK == 7680 and FRAMES_PER_CHUNK == 12
    assert PRESETS["r1-480p"].tokens_per_frame == 1560
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")


def test_network_shapes(tiny, tiny_nets):
    p, n = tiny, tiny_nets
    image = torch.from_numpy(ref_image(p))[None].repeat(2, 1, 1, 1)  # (2, H, W, 3)
    with torch.no_grad():
        latent = n.vae_encoder(image)
        assert latent.shape == (2, LATENT_CHANNELS, p.latent_height, p.latent_width)
        frames = n.vae_decoder(torch.randn(2, 4, LATENT_CHANNELS, p.latent_height, p.latent_width))
        assert frames.shape == (2, 12, p.height, p.width, 3) and frames.dtype == torch.uint8
        feats = n.audio_encoder(torch.randn(2, p.audio_window_samples))
        assert feats.shape == (2, AUDIO_FEATURES_PER_CHUNK, p.audio.d_model)
        tokens = n.text_encoder(tokenize(["speaking", "wave with the left hand"], p.prompt_tokens))
        assert tokens.shape == (2, p.prompt_tokens, p.text_dim)
        x, t, audio, prompt, memory, valid = denoiser_inputs(p)
        kv = n.denoiser.memory_kv(memory, valid)
        head_dim = p.dim // p.heads
        assert kv.shape == (2, p.depth, 2, p.heads, p.memory_frames * p.tokens_per_frame, head_dim)
        assert n.denoiser.forward_stream(x, t, audio, prompt, kv, valid).shape == x.shape


def test_fake_causal_mask_memory_ignores_stream(tiny, tiny_nets):
    x, t, audio, prompt, memory, valid = denoiser_inputs(tiny)
    with torch.no_grad():
        v1, m1 = tiny_nets.denoiser.forward_joint(x, t, audio, prompt, memory, valid)
        v2, m2 = tiny_nets.denoiser.forward_joint(torch.randn_like(x), torch.rand_like(t), torch.randn_like(audio),
                                                  torch.randn_like(prompt), memory, valid)
    assert torch.equal(m1, m2)  # memory tokens never see the stream
    assert not torch.allclose(v1, v2)


def test_cached_memory_kv_equals_joint_attention(tiny, tiny_nets):
    x, t, audio, prompt, memory, valid = denoiser_inputs(tiny)
    d = tiny_nets.denoiser
    with torch.no_grad():
        v_joint, _ = d.forward_joint(x, t, audio, prompt, memory, valid)
        v_cached = d.forward_stream(x, t, audio, prompt, d.memory_kv(memory, valid), valid)
    diff = (v_joint - v_cached).abs()
    print(f"cached vs joint: max {diff.max():.2e} mean {diff.mean():.2e}")
    assert diff.max() < 1e-5


def test_memory_bank_rotation():
    ref = torch.zeros(LATENT_CHANNELS, 2, 2)
    bank = MemoryBank(ref, long_term_size=3)
    assert bank.valid.tolist() == [True] + [False] * 6
    for i in range(1, 7):
        bank.push(torch.full((3, LATENT_CHANNELS, 2, 2), float(i)))
    # short-term = chunk 6; long-term = last frames of chunks 3, 4, 5 (oldest first)
    assert bank.latents[1:4, 0, 0, 0].tolist() == [3.0, 4.0, 5.0]
    assert bank.latents[4:, 0, 0, 0].tolist() == [6.0] * 3
    assert bank.valid.all()
    assert MemoryBank(ref, long_term_size=0).latents.shape[0] == 4


def test_memory_bounded_over_long_stream(tiny, tiny_engines):
    session = StreamSession(tiny, tiny_engines)
    session.start(ref_image(tiny), seed=3)
    sizes = set()
    for chunk in speech_chunks(110, seed=1):
        session.step(chunk)
        sizes.add((tuple(session.memory.latents.shape), session.audio_window.shape, len(session.prompts.cache)))
    assert session.chunk_index == 110
    assert sizes == {((tiny.memory_frames, LATENT_CHANNELS, tiny.latent_height, tiny.latent_width),
                      (tiny.audio_window_samples,), 1)}


def test_determinism_by_seed(tiny, tiny_engines):
    chunks = speech_chunks(5)
    a = run_session(tiny, tiny_engines, 7, chunks)
    b = run_session(tiny, tiny_engines, 7, chunks)
    c = run_session(tiny, tiny_engines, 8, chunks)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batched_step_equals_per_session(tiny, tiny_engines):
    seeds, images = [1, 2, 3], [ref_image(tiny, s) for s in range(3)]
    audio = [speech_chunks(6, seed=s) for s in seeds]
    alone = [run_session(tiny, tiny_engines, seed, audio[i], images[i]) for i, seed in enumerate(seeds)]
    sessions = [StreamSession(tiny, tiny_engines) for _ in seeds]
    for s, seed, img in zip(sessions, seeds, images):
        s.start(img, seed=seed)
    together = [[] for _ in seeds]
    for k in range(6):  # 6 chunks: memory refinement (every 4) runs inside the batch too
        for i, frames in enumerate(step_batch(sessions, [a[k] for a in audio], [None] * 3)):
            together[i].append(frames)
    for i in range(3):
        diff = np.abs(alone[i].astype(int) - np.stack(together[i]).astype(int))
        print(f"stream {i}: max {diff.max()} mean {diff.mean():.4f}")
        assert diff.max() <= 1 and diff.mean() < 1e-3


def test_memory_refinement_changes_short_term(tiny, tiny_engines):
    chunks = speech_chunks(5)
    with_refine = StreamSession(tiny, tiny_engines)
    with_refine.start(ref_image(tiny), seed=1)
    without = StreamSession(tiny.with_(refine_every=0), tiny_engines)
    without.start(ref_image(tiny), seed=1)
    for c in chunks[:4]:
        with_refine.step(c), without.step(c)
    assert torch.equal(with_refine.memory.latents, without.memory.latents)
    assert with_refine.refinement_due() and not without.refinement_due()
    with_refine.step(chunks[4]), without.step(chunks[4])
    assert not torch.equal(with_refine.memory.latents[1:4], without.memory.latents[1:4])


def test_checkpoint_round_trip(tmp_path, tiny, tiny_nets):
    tiny_nets.save(tmp_path / "ckpt")
    assert sorted(f.name for f in (tmp_path / "ckpt").iterdir()) == sorted(
        [f"{n}.safetensors" for n in tiny_nets.NAMES] + ["preset.json"])
    loaded = build_networks(tiny, seed=123, checkpoint=tmp_path / "ckpt")
    for name, module in tiny_nets.modules().items():
        other = loaded.modules()[name].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in module.state_dict().items()), name
    chunks = speech_chunks(2)
    assert np.array_equal(run_session(tiny, Engines.from_networks(loaded), 1, chunks),
                          run_session(tiny, Engines.from_networks(tiny_nets), 1, chunks))
    with pytest.raises(ValueError, match="different preset"):
        build_networks(tiny.with_(long_term_size=1), checkpoint=tmp_path / "ckpt")


@pytest.mark.parametrize("audio, sample_rate, message", [
    (np.zeros(SAMPLES_PER_CHUNK, np.float64), 16_000, "dtype must be float32"),
    (np.zeros(SAMPLES_PER_CHUNK - 1, np.float32), 16_000, r"shape must be \(7680,\)"),
    (np.zeros((2, SAMPLES_PER_CHUNK), np.float32), 16_000, r"shape must be \(7680,\)"),
    (np.full(SAMPLES_PER_CHUNK, np.nan, np.float32), 16_000, "NaN or Inf"),
    (np.zeros(SAMPLES_PER_CHUNK, np.float32), 44_100, "sample rate must be 16000"),
    ([0.0] * SAMPLES_PER_CHUNK, 16_000, "numpy float32 array"),
])
def test_bad_audio_is_refused(tiny, tiny_engines, audio, sample_rate, message):
    session = StreamSession(tiny, tiny_engines)
    session.start(ref_image(tiny), seed=0)
    with pytest.raises(InputError, match=message):
        session.step(audio, sample_rate=sample_rate)
    assert session.chunk_index == 0
    session.step(speech_chunks(1)[0])  # the session still works


@pytest.mark.parametrize("image, message", [
    (np.zeros((32, 32, 3), np.uint8), r"shape must be \(64, 64, 3\)"),
    (np.zeros((64, 64), np.uint8), "shape must be"),
    (np.zeros((64, 64, 3), np.float32), "dtype must be uint8"),
])
def test_bad_image_is_refused(tiny, tiny_engines, image, message):
    with pytest.raises(InputError, match=message):
        StreamSession(tiny, tiny_engines).start(image, seed=0)


def test_step_before_start_and_bad_seed(tiny, tiny_engines):
    with pytest.raises(InputError, match="not started"):
        StreamSession(tiny, tiny_engines).step(speech_chunks(1)[0])
    with pytest.raises(InputError, match="seed"):
        StreamSession(tiny, tiny_engines).start(ref_image(tiny), seed=-1)


def test_generate_trims_video_to_audio(tmp_path):
    import soundfile as sf
    from PIL import Image

    from flowact.generate import generate

    samples = SAMPLES_PER_CHUNK * 2 + 1000  # 2.13 chunks: the last chunk is padded, the video trimmed
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "a.wav", (0.1 * rng.standard_normal(samples)).astype(np.float32), 16_000)
    Image.fromarray(ref_image(get_preset("tiny"))).save(tmp_path / "ref.png")
    summary = generate("tiny", tmp_path / "ref.png", tmp_path / "a.wav", tmp_path / "out.mp4")
    assert summary.chunks == 3
    frames, fps, audio, rate = read_mp4(tmp_path / "out.mp4")
    assert fps == 25 and len(frames) == int(np.ceil(samples * 25 / 16_000)) == 26
    assert rate == 16_000 and samples <= len(audio) < samples + 2048
