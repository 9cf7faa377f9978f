"""Whisper-architecture audio encoder: log-mel front end, transformer encoder, streaming wrapper.

Three pieces, read top-down:
- `LogMel`: Whisper's log-mel spectrogram, with the STFT written as a conv1d over fixed DFT kernels
  (no torch.stft), so the whole front end exports to ONNX and TensorRT.
- `WhisperEncoder`: conv stem + learned positions + pre-LN transformer. Parameter names are those of
  transformers' `WhisperEncoder`, so a Whisper checkpoint loads with `load_whisper_state_dict`.
- `StreamingAudioEncoder`: the exported network. One fixed-length audio window (the stream's
  bounded left context followed by the new chunk) in, one chunk of audio features (25 per second,
  one per video frame) out.

This module knows nothing about streams: keeping the left context between requests (and
zero-filling it at stream start) is the stream engine's job.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowact.presets import (AUDIO_FEATURES_PER_CHUNK, HOP_LENGTH, N_FFT, SAMPLE_RATE, SAMPLES_PER_CHUNK,
                             AudioEncoderConfig)

ENCODER_STRIDE = 2 * HOP_LENGTH  # audio samples per encoder frame (conv2 halves 100 mel frames/s to 50/s)


# ------------------------------------------------------------------------------------------------
# Front end
# ------------------------------------------------------------------------------------------------

def mel_filterbank(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-scale, slaney-normalised triangular filters, as librosa.filters.mel(sr, n_fft, n_mels)
    (the defaults Whisper uses). Returns [n_mels, n_fft // 2 + 1] float64."""

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:  # linear below 1 kHz, logarithmic above
        f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0
        return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep,
                        hz / f_sp)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0
        return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)

    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # [F]
    mel_hz = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sample_rate / 2)), n_mels + 2))  # [M+2]
    ramps = mel_hz[:, None] - fft_hz[None, :]  # [M+2, F]
    widths = np.diff(mel_hz)  # [M+1]
    lower = -ramps[:-2] / widths[:-1, None]  # [M, F] rising edge
    upper = ramps[2:] / widths[1:, None]  # [M, F] falling edge
    weights = np.maximum(0.0, np.minimum(lower, upper))  # [M, F]
    return weights * (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]  # slaney norm: constant energy per filter


class LogMel(nn.Module):
    """Whisper's log-mel spectrogram: hann window 400, hop 160, centre (reflect) padding, power
    spectrum with the last frame dropped, slaney mel filters, log10 clamped at 1e-10, floored at
    8 below each item's maximum, scaled by (x + 4) / 4. Frame i is centred on sample 160 * i."""

    def __init__(self, n_mels: int):
        super().__init__()
        n_bins = N_FFT // 2 + 1
        n = torch.arange(N_FFT, dtype=torch.float64)
        k = torch.arange(n_bins, dtype=torch.float64)
        window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64)  # [N_FFT]
        phase = 2 * math.pi * k[:, None] * n[None, :] / N_FFT  # [n_bins, N_FFT]
        dft = torch.cat([torch.cos(phase), -torch.sin(phase)]) * window  # [2 * n_bins, N_FFT] real; imaginary
        self.register_buffer("dft_kernels", dft[:, None, :].float(), persistent=False)  # [2 * n_bins, 1, N_FFT]
        self.register_buffer("mel_filters", torch.from_numpy(mel_filterbank(n_mels)).float(), persistent=False)  # [n_mels, n_bins]

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = F.pad(audio[:, None, :], (N_FFT // 2, N_FFT // 2), mode="reflect")  # [B, 1, S + N_FFT]
        spec = F.conv1d(x, self.dft_kernels, stride=HOP_LENGTH)  # [B, 2 * n_bins, S // HOP + 1]
        real, imag = spec[:, :, :-1].chunk(2, dim=1)  # [B, n_bins, S // HOP] each; last frame dropped
        power = real * real + imag * imag  # [B, n_bins, T]
        mel = torch.matmul(self.mel_filters, power)  # [B, n_mels, T]
        log_spec = torch.clamp(mel, min=1e-10).log10()  # [B, n_mels, T]
        log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)  # [B, n_mels, T]
        return (log_spec + 4.0) / 4.0  # [B, n_mels, T]


def log_mel(audio: torch.Tensor, n_mels: int) -> torch.Tensor:
    """[B, S] float32 16 kHz audio -> [B, n_mels, S // 160] Whisper log-mel features."""
    return LogMel(n_mels).to(audio.device)(audio)


# ------------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------------

class WhisperAttention(nn.Module):
    """Bidirectional multi-head self-attention; k_proj has no bias, as in Whisper."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, T, Dh]
        v = self.v_proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, T, Dh]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, Dh]
        return self.out_proj(out.transpose(1, 2).flatten(2))  # [B, T, D]


class WhisperEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = WhisperAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))  # [B, T, D]
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))  # [B, T, D]


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder: [B, n_mels, T] log-mel -> [B, T // 2, d_model].

    Names match transformers' WhisperEncoder parameter for parameter. Positions are learned and
    start at 0; inputs shorter than Whisper's 30 s use the first T // 2 of them."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.layers = nn.ModuleList([WhisperEncoderLayer(cfg.d_model, cfg.heads) for _ in range(cfg.layers)])
        self.layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(mel))  # [B, D, T]
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [B, T / 2, D]
        x = x + self.embed_positions.weight[: x.shape[1]]  # [B, T / 2, D]
        for layer in self.layers:
            x = layer(x)  # [B, T / 2, D]
        return self.layer_norm(x)  # [B, T / 2, D]

    def load_whisper_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Load the weights of transformers' WhisperEncoder (strict). The names are identical; `prefix`
        selects the encoder inside a larger checkpoint ("model.encoder." for
        WhisperForConditionalGeneration, "encoder." for WhisperModel)."""
        encoder_weights = {name[len(prefix):]: w for name, w in state_dict.items() if name.startswith(prefix)}
        self.load_state_dict(encoder_weights, strict=True)


# ------------------------------------------------------------------------------------------------
# Streaming wrapper (the exported network)
# ------------------------------------------------------------------------------------------------

class StreamingAudioEncoder(nn.Module):
    """audio_window [B, context_samples + SAMPLES_PER_CHUNK] -> features [B, AUDIO_FEATURES_PER_CHUNK, d_model].

    The window is the stream's bounded left context followed by the new chunk; its length is fixed
    by the preset, so every shape is static but the batch.

    Alignment (default window: 8,320 + 7,680 = 16,000 samples):
    - log-mel frame i is centred on window sample 160 * i (S // 160 = 100 frames);
    - encoder frame j (conv2, stride 2) is centred on mel frame 2 * j, i.e. window sample 320 * j
      (50 frames), with position j (positions start at 0 for the window);
    - the new chunk starts at window sample context_samples = 26 * 320, so encoder frames 26..49 (the
      last SAMPLES_PER_CHUNK // 320 = 24) are centred inside the chunk, on chunk samples 320 * m;
    - video frame f of the chunk covers chunk samples [640 f, 640 (f + 1)): its feature is the mean
      of encoder frames 2 f and 2 f + 1 of the chunk.
    Every feature still sees the whole window through attention (and the per-window log-mel max), and
    nothing before it.
    """

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        window = cfg.context_samples + SAMPLES_PER_CHUNK
        if cfg.context_samples % ENCODER_STRIDE or window // ENCODER_STRIDE > cfg.max_positions:
            raise ValueError(f"context_samples {cfg.context_samples} must be a multiple of {ENCODER_STRIDE} and the "
                             f"window at most {cfg.max_positions * ENCODER_STRIDE} samples")
        self.window_samples = window
        self.chunk_frames = SAMPLES_PER_CHUNK // ENCODER_STRIDE  # 24 encoder frames per chunk
        assert self.chunk_frames == 2 * AUDIO_FEATURES_PER_CHUNK
        self.log_mel = LogMel(cfg.n_mels)
        self.encoder = WhisperEncoder(cfg)

    def forward(self, audio_window: torch.Tensor) -> torch.Tensor:
        mel = self.log_mel(audio_window)  # [B, n_mels, W / 160]
        h = self.encoder(mel)  # [B, W / 320, D]
        h = h[:, -self.chunk_frames:]  # [B, 24, D] the frames centred in the new chunk
        return h.unflatten(1, (AUDIO_FEATURES_PER_CHUNK, 2)).mean(dim=2)  # [B, 12, D]
