"""Model presets: the stream geometry every preset shares, and the sizes that differ.

Presets are typed, frozen and registered by name (`tiny`, `cpu`, `r1-480p`); nothing else in the
project hard-codes a size. This module knows nothing about torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Shared stream geometry (FlowAct-R1 / Wan2.1 latent geometry).
FPS = 25
FRAMES_PER_CHUNK = 12  # 0.48 s of video per request
SAMPLE_RATE = 16_000  # mono speech
SAMPLES_PER_CHUNK = SAMPLE_RATE * FRAMES_PER_CHUNK // FPS  # 7,680 audio samples per request
VAE_TEMPORAL_STRIDE = 4
VAE_SPATIAL_STRIDE = 8
LATENT_CHANNELS = 16
LATENT_FRAMES_PER_CHUNK = FRAMES_PER_CHUNK // VAE_TEMPORAL_STRIDE  # 3
AUDIO_FEATURES_PER_CHUNK = FRAMES_PER_CHUNK  # audio features at 25 per second, one per frame
CHUNK_SECONDS = FRAMES_PER_CHUNK / FPS  # 0.48

# Whisper front end (fixed by the Whisper architecture).
N_FFT = 400
HOP_LENGTH = 160  # 100 mel frames per second; the conv stem halves it to 50 per second
WHISPER_WINDOW_SAMPLES = 30 * SAMPLE_RATE  # the window Whisper weights were trained on



@dataclass(frozen=True)
class AudioEncoderConfig:
    """Whisper encoder sizes (field names follow Whisper's config)."""

    n_mels: int = 80  # log-mel bins (80 for Whisper v1/v2, 128 for v3)
    d_model: int = 64  # transformer width
    layers: int = 2  # transformer layers
    heads: int = 2  # attention heads
    max_positions: int = 1500  # learned positions: 30 s at 50 per second
    context_samples: int = 8_320  # left context kept per stream; window = context + one chunk


@dataclass(frozen=True)
class Preset:
    """One model size. Every field but `name` changes the weights' shapes or the stream's maths."""

    name: str
    height: int  # output video height in pixels
    width: int  # output video width in pixels
    dim: int  # denoiser width
    depth: int  # denoiser joint blocks
    heads: int  # denoiser attention heads
    patch: int = 2  # spatial patch size on the latent grid
    mlp_ratio: float = 4.0
    audio: AudioEncoderConfig = AudioEncoderConfig()
    text_dim: int = 64  # prompt encoder width
    text_layers: int = 2  # prompt encoder transformer layers
    prompt_tokens: int = 16  # prompt length in bytes (longer prompts are truncated)
    vae_channels: tuple[int, ...] = (64, 32, 16, 8)  # decoder widths, latent resolution -> pixels
    long_term_size: int = 3  # long-term memory entries (latent frames); the paper uses at most 3
    nfe: int = 3  # denoising steps per chunk (distilled)
    timestep_shift: float = 3.0  # flow-matching schedule shift (SD3 / Wan)
    refine_every: int = 4  # memory refinement every K chunks (0 = never)
    refine_t: float = 0.3  # noise level short-term memory is re-noised to for refinement

    def __post_init__(self):
        if self.height % (VAE_SPATIAL_STRIDE * self.patch) or self.width % (VAE_SPATIAL_STRIDE * self.patch):
            raise ValueError(f"{self.name}: {self.height}x{self.width} is not a multiple of {VAE_SPATIAL_STRIDE * self.patch}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"{self.name}: head dim {self.dim}/{self.heads} must be even for 3D RoPE")

    @property
    def latent_height(self) -> int:
        return self.height // VAE_SPATIAL_STRIDE

    @property
    def latent_width(self) -> int:
        return self.width // VAE_SPATIAL_STRIDE

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_height // self.patch) * (self.latent_width // self.patch)

    @property
    def memory_frames(self) -> int:
        """Latent frames in the memory bank: reference + long-term slots + short-term chunk."""
        return 1 + self.long_term_size + LATENT_FRAMES_PER_CHUNK

    @property
    def audio_window_samples(self) -> int:
        return self.audio.context_samples + SAMPLES_PER_CHUNK

    def with_(self, **changes) -> "Preset":
        """A variant (ablations, tests): `PRESETS['tiny'].with_(long_term_size=0)`."""
        return replace(self, **changes)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(name="tiny", height=64, width=64, dim=48, depth=2, heads=2, text_dim=32, text_layers=1,
               audio=AudioEncoderConfig(n_mels=80, d_model=32, layers=2, heads=2),
               vae_channels=(32, 16, 16, 8)),
        Preset(name="cpu", height=128, width=128, dim=192, depth=8, heads=4, text_dim=64,
               audio=AudioEncoderConfig(n_mels=80, d_model=128, layers=2, heads=2),
               vae_channels=(64, 32, 24, 16)),
        Preset(name="r1-480p", height=480, width=832, dim=1536, depth=30, heads=12, text_dim=512, text_layers=4,
               prompt_tokens=32, audio=AudioEncoderConfig(n_mels=128, d_model=1280, layers=32, heads=20),
               vae_channels=(384, 192, 96, 96)),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
