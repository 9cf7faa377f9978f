"""Resumable streams: an opaque, versioned, signed snapshot of one stream's `StreamState`.

A snapshot holds everything a stream carries between chunks (memory bank, decode context, audio
context window, RNG state, chunk index, last audio features and prompts), so a START with it on
any server of the same deployment continues the stream with the frames an uninterrupted run would
have produced: a stream survives the loss of its pod.

Integrity: HMAC-SHA256 under a deployment secret (FLOWACT_SNAPSHOT_KEY, shared by every replica,
e.g. a Kubernetes Secret). A plain SHA-256 would only catch accidents; the client holds the
snapshot, so it could rewrite the state (memory, RNG, chunk index) and re-hash it. With the HMAC
a client can only hand back a snapshot this deployment made. Without a key, snapshots are off.
Rotate the key when the weights change: old snapshots then fail the check instead of resuming
onto other weights.

Layout (little-endian):
    MAGIC (4) | version u16 | header length u32 | header JSON | arrays, in ARRAY order | HMAC (32)
The header names the preset and its fingerprint; the array layout is derived from the preset,
never read from the header, so a snapshot cannot make the server allocate what it did not expect.

The layout is `StreamState.layout` (flowact.state): the state class lists its own fields, and
`arrays()` / `load()` read and write them, so this codec holds no list of its own. The generator
state is the device kind's (CPU or CUDA), so a snapshot resumes on devices of the same kind; the
fingerprint covers the device kind, so another kind refuses it by name.

This module knows nothing about Triton; it raises `SnapshotError` (an InputError) naming `field`,
the request input the snapshot came in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import struct
from typing import TYPE_CHECKING

import numpy as np

from flowact.contract import MAX_PROMPT_BYTES, SNAPSHOT_KEY_ENV
from flowact.presets import Preset
from flowact.state import StreamState
from flowact.validate import InputError, check_prompt

if TYPE_CHECKING:
    from flowact.engine import StreamEngine

VERSION = 2  # 2: layout from StreamState (generator of the device kind)
MAGIC = b"FASN"
MIN_KEY_BYTES = 16
MAX_HEADER_BYTES = 4 * MAX_PROMPT_BYTES + 1024  # two prompts, JSON-escaped, plus a few fields
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_MAC_BYTES = 32


class SnapshotError(InputError):
    """A snapshot this server refuses; the message says why."""


def preset_fingerprint(preset: Preset, device_kind: str = "cpu", quantized: bool = False) -> str:
    """Hash of every preset field, the device kind and, for int8 networks, that: two servers resume each
    other's streams only if it matches (float runtimes agree within a level; int8 does not)."""
    fields = {**dataclasses.asdict(preset), "device_kind": device_kind, **({"quantized": "int8"} if quantized else {})}
    fields = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(fields.encode()).hexdigest()[:16]


def max_snapshot_bytes(preset: Preset, device_kind: str = "cpu") -> int:
    arrays = sum(int(np.prod(shape)) * dtype.itemsize for _, dtype, shape in StreamState.layout(preset, device_kind))
    return _PREFIX.size + MAX_HEADER_BYTES + arrays + _MAC_BYTES


def key_from_env(env: dict[str, str] | None = None) -> bytes | None:
    """The deployment's snapshot key, or None (snapshots off). A short key is a configuration error."""
    value = (os.environ if env is None else env).get(SNAPSHOT_KEY_ENV, "")
    if not value:
        return None
    key = value.encode()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{SNAPSHOT_KEY_ENV} must be at least {MIN_KEY_BYTES} bytes (e.g. `openssl rand -hex 32`)")
    return key


class SnapshotCodec:
    """Encode a stream's state into a signed snapshot, and continue a stream from one."""

    def __init__(self, preset: Preset, key: bytes, field: str = "snapshot", device_kind: str = "cpu",
                 quantized: bool = False):
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"snapshot key must be at least {MIN_KEY_BYTES} bytes")
        self.preset, self.key, self.field, self.device_kind, self.quantized = preset, key, field, device_kind, quantized
        self.fingerprint = preset_fingerprint(preset, device_kind, quantized)
        self.layout = StreamState.layout(preset, device_kind)
        self.max_bytes = max_snapshot_bytes(preset, device_kind)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self.key, body, hashlib.sha256).digest()

    # --- export -----------------------------------------------------------------------------------

    def encode(self, state: StreamState, version: int = VERSION) -> bytes:
        """A started stream's state after its last chunk. (`version` exists for tests.)"""
        if not state.started:
            raise ValueError("cannot snapshot a stream that has not started")
        header = {"preset": self.preset.name, "fingerprint": self.fingerprint, **state.header()}
        values = state.arrays()
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        parts = [_PREFIX.pack(MAGIC, version, len(header_bytes)), header_bytes]
        for name, dtype, shape in self.layout:
            array = np.ascontiguousarray(values[name], dtype=dtype.newbyteorder("<"))
            assert array.shape == shape, (name, array.shape, shape)
            parts.append(array.tobytes())
        body = b"".join(parts)
        return body + self._mac(body)

    # --- import -----------------------------------------------------------------------------------

    def decode(self, blob: bytes) -> dict:
        """Check a snapshot (size, magic, version, signature, preset, values) -> its parts by name."""
        if len(blob) > self.max_bytes:
            raise SnapshotError(f"{self.field}: {len(blob)} bytes is more than a {self.preset.name} snapshot "
                                f"can be ({self.max_bytes})")
        if len(blob) < _PREFIX.size + _MAC_BYTES:
            raise SnapshotError(f"{self.field}: {len(blob)} bytes is too short to be a snapshot")
        magic, version, header_len = _PREFIX.unpack_from(blob)
        if magic != MAGIC:
            raise SnapshotError(f"{self.field}: not a flowact stream snapshot (bad magic)")
        if version != VERSION:
            raise SnapshotError(f"{self.field}: version {version} is not supported (this server reads version {VERSION})")
        body, mac = blob[:-_MAC_BYTES], blob[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise SnapshotError(f"{self.field}: integrity check failed (tampered, truncated, or made by a deployment "
                                "with another snapshot key)")
        # Signed by this deployment from here on; still checked, as a second line of defence.
        if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(body):
            raise SnapshotError(f"{self.field}: header length out of range")
        try:
            header = json.loads(body[_PREFIX.size:_PREFIX.size + header_len])
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SnapshotError(f"{self.field}: unreadable header") from None
        if not isinstance(header, dict):
            raise SnapshotError(f"{self.field}: unreadable header")
        if header.get("preset") != self.preset.name or header.get("fingerprint") != self.fingerprint:
            raise SnapshotError(f"{self.field}: made for preset {header.get('preset')!r} (fingerprint "
                                f"{header.get('fingerprint')}), this server runs {self.preset.name!r} on "
                                f"{self.device_kind}{' with int8 networks' if self.quantized else ''} "
                                f"(fingerprint {self.fingerprint})")
        offset = _PREFIX.size + header_len
        arrays = {}
        for name, dtype, shape in self.layout:
            n = int(np.prod(shape)) * dtype.itemsize
            if offset + n > len(body):
                raise SnapshotError(f"{self.field}: shorter than its preset's state")
            arrays[name] = np.frombuffer(body, dtype=dtype.newbyteorder("<"), count=int(np.prod(shape)),
                                         offset=offset).reshape(shape).astype(dtype)
            offset += n
        if offset != len(body):
            raise SnapshotError(f"{self.field}: longer than its preset's state")
        chunk_index = header.get("chunk_index")
        if isinstance(chunk_index, bool) or not isinstance(chunk_index, int) or not 0 <= chunk_index < 2**53:
            raise SnapshotError(f"{self.field}: chunk index {chunk_index!r} out of range")
        for name in ("memory_latents", "decode_context", "audio_window", "last_audio_features"):
            if not np.isfinite(arrays[name]).all():
                raise SnapshotError(f"{self.field}: {name} holds NaN or Inf")
        if not arrays["memory_valid"][0]:
            raise SnapshotError(f"{self.field}: the reference slot of the memory bank is empty")
        prompts = {k: check_prompt(header.get(k), f"{self.field} {k}") for k in ("prompt", "last_prompt")}
        return {**arrays, **prompts, "chunk_index": chunk_index, "has_last_audio": bool(header.get("has_last_audio"))}

    def restore(self, engine: StreamEngine, blob: bytes) -> StreamState:
        """A checked snapshot's stream, continued in `engine` (instead of `engine.start`)."""
        parts = self.decode(blob)
        header = {k: parts.pop(k) for k in StreamState.HEADER}
        try:
            return engine.resume(parts, header)
        except RuntimeError as e:  # the generator refused its state
            raise SnapshotError(f"{self.field}: invalid RNG state ({e})") from None


# --- one size per preset: RESUME has fixed dims, so Triton itself refuses any other size ----------


def padded(blob: bytes, size: int) -> bytes:
    """A snapshot padded with zeros to its preset's fixed size (max_snapshot_bytes): the SNAPSHOT output."""
    if len(blob) > size:
        raise ValueError(f"snapshot of {len(blob)} bytes exceeds its preset's size {size}")
    return blob + bytes(size - len(blob))


def unpadded(blob: bytes, padded_size: int) -> bytes:
    """The signed snapshot inside one padded to `padded_size` (max_snapshot_bytes of the server's preset
    and device kind; a blob that is no padded snapshot comes back as it is, for decode to refuse). The
    padding is not signed and is ignored: it carries nothing."""
    if len(blob) < _PREFIX.size:
        return blob
    magic, _, header_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC or header_len > MAX_HEADER_BYTES:
        return blob
    size = padded_size - MAX_HEADER_BYTES + header_len  # prefix | header | arrays | HMAC
    return blob[:size] if size <= len(blob) else blob


def peek_preset(blob: bytes) -> str | None:
    """The preset a snapshot names in its header (unverified: only to word a refusal), or None."""
    if len(blob) < _PREFIX.size:
        return None
    magic, _, header_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC or header_len > MAX_HEADER_BYTES or len(blob) < _PREFIX.size + header_len:
        return None
    try:
        header = json.loads(blob[_PREFIX.size:_PREFIX.size + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    preset = header.get("preset") if isinstance(header, dict) else None
    return preset[:64] if isinstance(preset, str) else None
