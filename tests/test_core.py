"""The model family and the per-stream engine, in process, on the tiny preset."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from conftest import ref_image, run_stream, speech_chunks
from flowact.runtime import Runners
from flowact.engine import StreamEngine, sampling_times, valid_slots
from flowact.state import MemoryBank
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


def test_memory_bounded_over_long_stream(tiny, tiny_runners):
    engine = StreamEngine(tiny, tiny_runners)
    stream = engine.start(ref_image(tiny), seed=3)
    sizes = set()
    for chunk in speech_chunks(110, seed=1):
        engine.step([stream], [chunk])
        sizes.add((tuple(stream.memory.latents.shape), tuple(stream.audio_window.shape), len(engine.prompts.cache)))
    assert stream.chunk_index == 110
    assert sizes == {((tiny.memory_frames, LATENT_CHANNELS, tiny.latent_height, tiny.latent_width),
                      (tiny.audio_window_samples,), 1)}


def test_determinism_by_seed(tiny, tiny_runners):
    chunks = speech_chunks(5)
    a = run_stream(tiny, tiny_runners, 7, chunks)
    b = run_stream(tiny, tiny_runners, 7, chunks)
    c = run_stream(tiny, tiny_runners, 8, chunks)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batched_step_equals_per_stream(tiny, tiny_runners):
    seeds, images = [1, 2, 3], [ref_image(tiny, s) for s in range(3)]
    audio = [speech_chunks(6, seed=s) for s in seeds]
    alone = [run_stream(tiny, tiny_runners, seed, audio[i], images[i]) for i, seed in enumerate(seeds)]
    engine = StreamEngine(tiny, tiny_runners, capacity=len(seeds))
    streams = [engine.start(img, seed=seed) for seed, img in zip(seeds, images)]
    together = [[] for _ in seeds]
    for k in range(6):  # 6 chunks: memory refinement (every 4) runs inside the batch too
        for i, frames in enumerate(engine.step(streams, [a[k] for a in audio])):
            together[i].append(frames)
    for i in range(3):
        diff = np.abs(alone[i].astype(int) - np.stack(together[i]).astype(int))
        print(f"stream {i}: max {diff.max()} mean {diff.mean():.4f}")
        assert diff.max() <= 1 and diff.mean() < 1e-3


def test_memory_refinement_changes_short_term(tiny, tiny_runners):
    chunks = speech_chunks(5)
    engines = StreamEngine(tiny, tiny_runners), StreamEngine(tiny.with_(refine_every=0), tiny_runners)
    with_refine, without = (e.start(ref_image(tiny), seed=1) for e in engines)
    step = lambda c: [e.step([s], [c]) for e, s in zip(engines, (with_refine, without))]  # noqa: E731
    for c in chunks[:4]:
        step(c)
    assert torch.equal(with_refine.memory.latents, without.memory.latents)
    assert with_refine.refinement_due() and not without.refinement_due()
    step(chunks[4])
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
    assert np.array_equal(run_stream(tiny, Runners.from_networks(loaded), 1, chunks),
                          run_stream(tiny, Runners.from_networks(tiny_nets), 1, chunks))
    with pytest.raises(ValueError, match="different preset"):
        build_networks(tiny.with_(long_term_size=1), checkpoint=tmp_path / "ckpt")


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


def test_mask_free_attention_equals_all_true_mask(tiny, tiny_nets):
    """valid=None (no attn_mask: SDPA may take its flash kernel) is the maths of an all-true mask."""
    d, p = tiny_nets.denoiser, tiny
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(2, p.memory_frames, LATENT_CHANNELS, p.latent_height, p.latent_width, generator=g)
    valid = torch.ones(2, p.memory_frames, dtype=torch.bool)
    x = torch.randn(2, 3, LATENT_CHANNELS, p.latent_height, p.latent_width, generator=g)
    t = torch.full((2, 3), 0.7)
    audio, prompt = torch.randn(2, 12, p.audio.d_model, generator=g), torch.randn(2, p.prompt_tokens, p.text_dim, generator=g)
    with torch.inference_mode():
        kv_masked, kv_free = d.memory_kv(memory, valid), d.memory_kv(memory, None)
        v_masked = d.forward_stream(x, t, audio, prompt, kv_masked, valid)
        v_free = d.forward_stream(x, t, audio, prompt, kv_free, None)
    for name, a, b in (("memory kv", kv_masked, kv_free), ("velocity", v_masked, v_free)):
        diff = (a - b).abs()
        print(f"mask-free vs all-true mask, {name}: max {diff.max():.2e} mean {diff.mean():.2e}")
        assert diff.max() < 1e-5


@pytest.mark.parametrize("slots", [(0,), (0, 4, 5, 6), (0, 3, 4, 5, 6), (0, 1, 2, 3)])  # new streams; refinement
def test_valid_slots_only_equals_the_masked_bank(tiny, tiny_nets, slots):
    """A partial bank through its valid slots only (no mask, fewer tokens) is the maths of the whole
    bank with its mask: the same keys/values on those slots, the same velocity."""
    d, p = tiny_nets.denoiser, tiny
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(2, p.memory_frames, LATENT_CHANNELS, p.latent_height, p.latent_width, generator=g)
    valid = torch.zeros(2, p.memory_frames, dtype=torch.bool)
    valid[:, list(slots)] = True
    x = torch.randn(2, 3, LATENT_CHANNELS, p.latent_height, p.latent_width, generator=g)
    t = torch.full((2, 3), 0.7)
    audio, prompt = torch.randn(2, 12, p.audio.d_model, generator=g), torch.randn(2, p.prompt_tokens, p.text_dim, generator=g)
    index = torch.tensor(slots)
    tokens = d.token_valid(valid)[0]  # (Nm,): the valid slots' tokens, in bank order
    with torch.inference_mode():
        kv_masked, kv_slots = d.memory_kv(memory, valid), d.memory_kv(memory[:, index], None, index)
        v_masked = d.forward_stream(x, t, audio, prompt, kv_masked, valid)
        v_slots = d.forward_stream(x, t, audio, prompt, kv_slots, None)
    assert kv_slots.shape[-2] == len(slots) * kv_masked.shape[-2] // p.memory_frames
    for name, a, b in (("memory kv", kv_masked[..., tokens, :], kv_slots), ("velocity", v_masked, v_slots)):
        diff = (a - b).abs()
        print(f"slots {slots} vs masked bank, {name}: max {diff.max():.2e} mean {diff.mean():.2e}")
        assert diff.max() < 1e-5


def test_streams_with_and_without_memory_subsets_agree(tiny):
    """The torch runners' valid-slots path and the mask path (ONNX / TensorRT) give the same frames over
    a stream's first chunks (partial memory) and its first refinement. The trained tiny weights: seeded
    random ones barely depend on the memory (slots at wrong positions moved no pixel by more than 1,
    against 6, mean 0.42, with the trained ones)."""
    from flowact.networks import shipped_checkpoint

    trained = Runners.from_networks(build_networks(tiny, checkpoint=shipped_checkpoint("tiny")))
    masked = dataclasses.replace(trained, memory_subsets=False)
    assert trained.memory_subsets
    chunks = speech_chunks(6)
    a, b = run_stream(tiny, trained, 5, chunks), run_stream(tiny, masked, 5, chunks)
    diff = np.abs(a.astype(int) - b.astype(int))
    print(f"valid slots vs mask: max {diff.max()} mean {diff.mean():.5f}")
    assert diff.max() <= 1 and diff.mean() < 1e-3


def test_mixed_batch_of_new_and_steady_streams_equals_each_alone(tiny, tiny_runners):
    """A new stream (partial memory: its own group) joining steady ones (full memory, mask-free) changes
    nobody's frames."""
    seeds = [11, 12, 13]
    audio = [speech_chunks(8, seed=s) for s in seeds]
    alone = {s: run_stream(tiny, tiny_runners, s, audio[i][:8 if s != 13 else 3], ref_image(tiny, s))
             for i, s in enumerate(seeds)}
    engine = StreamEngine(tiny, tiny_runners, capacity=3)
    steady = [engine.start(ref_image(tiny, seed), seed=seed) for seed in seeds[:2]]
    got = {s: [] for s in seeds}
    for k in range(5):  # 5 chunks alone: their memory is full
        for seed, frames in zip(seeds, engine.step(steady, [audio[0][k], audio[1][k]])):
            got[seed].append(frames)
    assert all(s.memory.full() for s in steady)
    new = engine.start(ref_image(tiny, 13), seed=13)
    for k in range(5, 8):  # the new stream's first 3 chunks need the mask; the steady ones do not
        frames = engine.step([*steady, new], [audio[0][k], audio[1][k], audio[2][k - 5]])
        for seed, f in zip(seeds, frames):
            got[seed].append(f)
    for seed in seeds:
        diff = np.abs(alone[seed].astype(int) - np.stack(got[seed]).astype(int))
        print(f"stream {seed}: max {diff.max()} mean {diff.mean():.5f}")
        assert diff.max() <= 1 and diff.mean() < 1e-3


def test_state_pool_slots_and_capacity_check(tiny):
    from flowact.state import StateCapacityError, StatePool

    pool = StatePool(tiny, 2)
    a, b = pool.acquire(), pool.acquire()
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.acquire()
    pool.release(a)
    pool.release(a)  # idempotent
    latents = "memory_latents"
    assert pool.acquire().tensors[latents].data_ptr() == a.tensors[latents].data_ptr() == pool.slabs[latents][0].data_ptr()
    assert b.tensors[latents].data_ptr() == pool.slabs[latents][b.pool_slot].data_ptr()  # views, not copies
    with pytest.raises(StateCapacityError, match="capacity 100000000 needs .* lower the capacity"):
        StatePool(tiny, 10**8, check_fits=True)
    # a bf16 state whose runners compute the memory K/V in fp32 (TensorRT plans): counted in fp32
    bf16, trt = StatePool(tiny, 1, dtype=torch.bfloat16), StatePool(tiny, 1, dtype=torch.bfloat16, kv_dtype=torch.float32)
    assert trt.kv_bytes_per_stream == 2 * bf16.kv_bytes_per_stream and "K/V" in trt.describe_stream()
    assert trt.describe_stream().endswith("in float32") and bf16.describe_stream().endswith("in bfloat16")


def test_generator_state_sizes_match_torch():
    from flowact.state import RNG_STATE_BYTES

    assert RNG_STATE_BYTES["cpu"] == torch.Generator().get_state().numel()
    if torch.cuda.is_available():
        assert RNG_STATE_BYTES["cuda"] == torch.Generator(device="cuda").get_state().numel()


def test_bf16_state_feeds_float32_timesteps(tiny, tiny_nets):
    """The CUDA path's dtype (bf16 state, autocast), run on the CPU: the denoiser still gets float32 times
    (in bf16 0.857 would be 0.855, and the time embedding multiplies it by 1000)."""
    from flowact.runtime.pytorch import torch_runners

    nets = build_networks(tiny).to("cpu", torch.bfloat16)
    runners = torch_runners(nets, torch.bfloat16)
    seen = []

    def denoiser(x, t, *rest):
        seen.append(t)
        return runners.denoiser(x, t, *rest)

    engine = StreamEngine(tiny, dataclasses.replace(runners, denoiser=denoiser), dtype=torch.bfloat16)
    stream = engine.start(ref_image(tiny), seed=1)
    for chunk in speech_chunks(5):  # chunk 4 refines the memory: its times too
        engine.denoise([stream], [chunk])
    assert len(seen) > 5 * tiny.nfe and all(t.dtype == torch.float32 for t in seen)
    chunk = sampling_times(tiny.nfe, tiny.timestep_shift)[:-1]
    refinement = sampling_times(max(1, math.ceil(tiny.nfe * tiny.refine_t)), 1.0, start=tiny.refine_t)[:-1]
    expected = {float(np.float32(v)) for v in chunk + refinement}
    assert {float(v) for t in seen for v in t.flatten()} == expected  # bf16 would round 0.857 to 0.855


def test_cuda_context_loss_is_detected():
    """A lost CUDA context (a device-side assert) is seen after the failed call; a CPU device never is."""
    import subprocess
    import sys

    from flowact.runtime.pytorch import cuda_context_lost

    assert cuda_context_lost(torch.device("cpu")) is False
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA half of this check runs on a GPU machine")
    code = ("import torch\nfrom flowact.runtime.pytorch import cuda_context_lost\nd = torch.device('cuda')\n"
            "print(cuda_context_lost(d))\nx = torch.zeros(1, device=d)\n"
            "try:\n    x[torch.tensor([5], device=d)] = 1\n    torch.cuda.synchronize()\nexcept Exception:\n    pass\n"
            "print(cuda_context_lost(d))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ["False", "True"]


def test_memory_slots_benchmark_views_are_the_banks(tiny, tiny_runners):
    """benchmarks/memory_slots.py counts the views a real bank goes through, and the slots cost less."""
    from flowact.benchmarks import memory_slots

    views = memory_slots.views(tiny)
    engine = StreamEngine(tiny, tiny_runners)
    stream = engine.start(ref_image(tiny), seed=0)
    for k, chunk in enumerate(speech_chunks(tiny.long_term_size + 1)):
        assert views[f"chunk {k + 1}"] == valid_slots(stream.memory.valid)
        engine.denoise([stream], [chunk])
    assert stream.memory.full()
    assert views["refinement"] == valid_slots(stream.memory.without_short_term())
    rows = memory_slots.flops(tiny)
    assert all(r["slots"]["chunk_tflop"] < r["mask"]["chunk_tflop"] for r in rows.values())
