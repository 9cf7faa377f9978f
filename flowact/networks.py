"""The network family of a preset: build with seeded random weights, save and load checkpoints.

Checkpoint layout (a directory):
    preset.json                 {"preset": name, "fields": {...every Preset field...}}
    audio_encoder.safetensors   StreamingAudioEncoder state dict (Whisper encoder names inside)
    vae_encoder.safetensors     VAEEncoder
    vae_decoder.safetensors     VAEDecoder
    denoiser.safetensors        MMDiT
    text_encoder.safetensors    TextEncoder
A network too large for one file may instead be split into NAME-0000k-of-0000n.safetensors shards
(the loader merges them). Weights may be stored in float16; loading casts them to the parameters'
dtype. A checkpoint whose preset.json disagrees with the requested preset is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flowact.contract import CHECKPOINTS_ENV
from flowact.models.audio_encoder import StreamingAudioEncoder
from flowact.models.mmdit import MMDiT
from flowact.models.text_encoder import TextEncoder
from flowact.models.vae import VAEDecoder, VAEEncoder
from flowact.presets import Preset

# The family's modules, fresh (random weights), in the order build_networks draws them.
MODULES = {
    "audio_encoder": lambda preset: StreamingAudioEncoder(preset.audio),
    "vae_encoder": VAEEncoder,
    "vae_decoder": VAEDecoder,
    "denoiser": MMDiT,
    "text_encoder": TextEncoder,
}


@dataclass
class Networks:
    preset: Preset
    audio_encoder: StreamingAudioEncoder
    vae_encoder: VAEEncoder
    vae_decoder: VAEDecoder
    denoiser: MMDiT
    text_encoder: TextEncoder

    NAMES = tuple(MODULES)

    def modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.NAMES}

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> "Networks":
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fields = dataclasses.asdict(self.preset)
        (directory / "preset.json").write_text(json.dumps({"preset": self.preset.name, "fields": fields}, indent=2))
        for name, module in self.modules().items():
            state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            save_file(state, str(directory / f"{name}.safetensors"))




def shipped_checkpoint(preset_name: str) -> Path | None:
    """The shipped trained checkpoint of a preset (checkpoints/<preset>: tiny and cpu), if there is one.

    $FLOWACT_CHECKPOINTS, else the installed package's copy (the wheel ships them as
    flowact/checkpoints), else the checkout's checkpoints/ (editable install)."""
    installed = Path(__file__).resolve().parent / "checkpoints"
    root = os.environ.get(CHECKPOINTS_ENV) or (installed if installed.is_dir() else installed.parent.parent / "checkpoints")
    path = Path(root) / preset_name
    return path if (path / "preset.json").is_file() else None


def build_networks(preset: Preset, seed: int = 0, checkpoint: str | Path | None = None,
                   device: str | torch.device = "cpu") -> Networks:
    """Seeded random weights, or the checkpoint's weights when `checkpoint` is given. Eval mode, fp32,
    built directly on `device` (random weights then come from that device's generator)."""
    torch.manual_seed(seed)
    with torch.device(device):
        nets = Networks(preset, **{name: new(preset) for name, new in MODULES.items()})
    if checkpoint is not None:
        check_checkpoint(checkpoint, preset)
        for name, module in nets.modules().items():
            load_weights(module, checkpoint, name)
    for module in nets.modules().values():
        module.eval().requires_grad_(False)
    return nets


def build_network(preset: Preset, name: str, seed: int = 0, checkpoint: str | Path | None = None,
                  device: str | torch.device = "cpu") -> nn.Module:
    """The one module of the family that build_networks(...) holds as `name`, equal to it. From a
    checkpoint only that module is built and loaded. Seeded random weights are drawn in the family's
    order, so then the whole family is built and all but `name` dropped."""
    if checkpoint is None:
        return getattr(build_networks(preset, seed, device=device), name)
    check_checkpoint(checkpoint, preset)
    with torch.device(device):
        module = MODULES[name](preset)
    load_weights(module, checkpoint, name)
    return module.eval().requires_grad_(False)


def checkpoint_files(directory: str | Path, name: str) -> list[Path]:
    """The weight files of one network in a checkpoint: NAME.safetensors, or its shards in order."""
    directory = Path(directory)
    single = directory / f"{name}.safetensors"
    files = [single] if single.is_file() else sorted(directory.glob(f"{name}-*-of-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {directory} has no weights for {name} ({single.name} or shards)")
    return files


def check_checkpoint(directory: str | Path, preset: Preset) -> None:
    """Refuse a directory that is not a checkpoint of `preset`."""
    directory = Path(directory)
    meta_path = directory / "preset.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a flowact checkpoint (no preset.json)")
    fields = json.loads(meta_path.read_text())["fields"]
    expected = json.loads(json.dumps(dataclasses.asdict(preset)))
    if fields != expected:
        diff = sorted(k for k in expected if fields.get(k) != expected[k])
        raise ValueError(f"checkpoint {directory} was saved for a different preset (fields differ: {', '.join(diff)})")


def load_weights(module: nn.Module, directory: str | Path, name: str) -> None:
    """One network's weights from a checkpoint (its file or shards), every parameter and buffer."""
    state = {}
    for f in checkpoint_files(directory, name):
        state.update(load_file(str(f)))
    module.load_state_dict(state, strict=True)
