"""Audio encoder: parity with transformers' Whisper (encoder and feature extractor), streaming
shapes and dependence, ONNX export parity."""

import numpy as np
import pytest
import torch

from flowact.models.audio_encoder import StreamingAudioEncoder, WhisperEncoder, log_mel, mel_filterbank
from flowact.presets import PRESETS, SAMPLE_RATE, SAMPLES_PER_CHUNK, WHISPER_WINDOW_SAMPLES, AudioEncoderConfig

transformers = pytest.importorskip("transformers")


def report(name: str, ours: np.ndarray, ref: np.ndarray) -> float:
    diff = np.abs(ours - ref)
    print(f"{name}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g}")
    return float(diff.max())


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A modulated tone plus gated noise with a silent stretch (exercises the 8-below-max floor)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    audio = 0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 0.5 * t)
    audio += 0.05 * rng.standard_normal(t.shape) * (t % 3 < 2)
    audio[(t > 10) & (t < 11)] = 0.0
    return audio.astype(np.float32)


def test_encoder_matches_transformers_whisper_encoder():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    torch.manual_seed(0)
    hf_cfg = WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=256,
                           num_mel_bins=80, max_source_positions=1500)
    reference = HFWhisperEncoder(hf_cfg).eval()
    ours = WhisperEncoder(AudioEncoderConfig(n_mels=80, d_model=64, layers=2, heads=2, max_positions=1500)).eval()
    ours.load_whisper_state_dict(reference.state_dict())

    mel = torch.randn(1, 80, 3000)  # a full 30 s window
    with torch.no_grad():
        expected = reference(mel).last_hidden_state  # [1, 1500, 64]
        got = ours(mel)  # [1, 1500, 64]
    assert got.shape == expected.shape == (1, 1500, 64)
    assert report("encoder vs transformers", got.numpy(), expected.numpy()) < 1e-4  # measured 4.8e-7


def test_load_whisper_state_dict_strips_prefix():
    cfg = AudioEncoderConfig(n_mels=80, d_model=32, layers=1, heads=2, max_positions=100)
    source, target = WhisperEncoder(cfg), WhisperEncoder(cfg)
    target.load_whisper_state_dict({f"model.encoder.{k}": v for k, v in source.state_dict().items()},
                                   prefix="model.encoder.")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filterbank_matches_transformers(n_mels):
    from transformers.audio_utils import mel_filter_bank

    expected = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                               max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(mel_filterbank(n_mels), expected.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    from transformers import WhisperFeatureExtractor

    audio = speech_like(WHISPER_WINDOW_SAMPLES / SAMPLE_RATE)  # 30 s
    expected = WhisperFeatureExtractor(feature_size=n_mels)(audio, sampling_rate=SAMPLE_RATE,
                                                            return_tensors="np").input_features  # [1, M, 3000]
    got = log_mel(torch.from_numpy(audio)[None], n_mels).numpy()  # [1, M, 3000]
    assert got.shape == expected.shape == (1, n_mels, 3000)
    # Measured 3.4e-5 (80 mels) and 5.6e-5 (128); the extractor's own torch and numpy paths differ by 2.8e-5 / 4.5e-5.
    assert report(f"log_mel vs feature extractor ({n_mels} mels)", got, expected) < 2e-4


def test_log_mel_normalises_per_item():
    audio = torch.from_numpy(np.stack([speech_like(1.0, seed=1), 0.01 * speech_like(1.0, seed=2)]))  # [2, S]
    batched = log_mel(audio, 80)  # [2, 80, 100]
    single = torch.cat([log_mel(audio[i:i + 1], 80) for i in range(2)])  # [2, 80, 100]
    assert batched.shape == (2, 80, SAMPLE_RATE // 160)
    torch.testing.assert_close(batched, single)


@pytest.mark.parametrize("preset", ["tiny", "cpu"])
def test_streaming_encoder_shape_and_dependence(preset):
    cfg = PRESETS[preset].audio
    torch.manual_seed(0)
    model = StreamingAudioEncoder(cfg).eval()
    window = PRESETS[preset].audio_window_samples
    stream = torch.from_numpy(speech_like(3 * window / SAMPLE_RATE))[None]  # [1, 3W] a longer stream

    with torch.no_grad():
        features = model(stream[:, -window:])  # [1, 12, D]
        assert features.shape == (1, 12, cfg.d_model)

        # Audio before the window is not an input: changing it cannot change the features.
        earlier_changed = stream.clone()
        earlier_changed[:, :-window] = torch.randn_like(earlier_changed[:, :-window])
        torch.testing.assert_close(model(earlier_changed[:, -window:]), features, rtol=0, atol=0)

        # The new chunk drives every feature of the chunk.
        chunk_changed = stream[:, -window:].clone()
        chunk_changed[:, -SAMPLES_PER_CHUNK:] = 0.3 * torch.randn(1, SAMPLES_PER_CHUNK)
        per_feature_change = (model(chunk_changed) - features).abs().amax(dim=-1)  # [1, 12]
        assert (per_feature_change > 1e-3).all()

        batch = torch.cat([stream[:, -window:], chunk_changed])  # [2, W]
        assert model(batch).shape == (2, 12, cfg.d_model)


def test_streaming_encoder_rejects_misaligned_context():
    with pytest.raises(ValueError, match="multiple of 320"):
        StreamingAudioEncoder(AudioEncoderConfig(context_samples=8_100))


def test_onnx_export_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    cfg = PRESETS["tiny"].audio
    window = PRESETS["tiny"].audio_window_samples
    torch.manual_seed(0)
    model = StreamingAudioEncoder(cfg).eval()
    path = tmp_path / "audio_encoder.onnx"
    example = torch.from_numpy(np.stack([speech_like(window / SAMPLE_RATE, seed=s) for s in (0, 1)]))  # [2, W]
    torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=20,
                      input_names=["audio_window"], output_names=["audio_features"],
                      dynamic_shapes={"audio_window": {0: torch.export.Dim("batch", min=1, max=64)}})

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        audio = torch.from_numpy(np.stack([speech_like(window / SAMPLE_RATE, seed=10 + s) for s in range(batch)]))
        with torch.no_grad():
            expected = model(audio).numpy()  # [batch, 12, D]
        (got,) = session.run(None, {"audio_window": audio.numpy()})
        assert got.shape == expected.shape == (batch, 12, cfg.d_model)
        assert report(f"onnxruntime vs torch (batch {batch})", got, expected) < 1e-4
