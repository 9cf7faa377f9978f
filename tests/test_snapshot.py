"""flowact.snapshot in process, tiny preset: bit-identical resume, clear refusals, the RESUME padding."""

import re

import numpy as np
import pytest

from conftest import ref_image, run_stream, speech_chunks
from flowact.contract import SNAPSHOT_KEY_ENV
from flowact.presets import get_preset
from flowact.snapshot import SnapshotCodec, SnapshotError, key_from_env, max_snapshot_bytes, padded, peek_preset, unpadded

TINY = get_preset("tiny")
KEY = "test-snapshot-key-0123456789abcdef"


def test_snapshot_resumes_bit_identically_in_process(tiny, tiny_runners):
    from flowact.engine import StreamEngine

    chunks = speech_chunks(10, seed=3)  # crosses memory refinement (every 4 chunks) twice
    want = run_stream(tiny, tiny_runners, 3, chunks, ref_image(tiny, 3))
    codec = SnapshotCodec(tiny, KEY.encode())
    engine = StreamEngine(tiny, tiny_runners, capacity=2)
    stream = engine.start(ref_image(tiny, 3), seed=3)
    got = engine.step([stream], chunks[:1])
    for c in chunks[1:]:  # a fresh stream from a snapshot before every chunk
        old, stream = stream, codec.restore(engine, codec.encode(stream))
        engine.end(old)
        got += engine.step([stream], [c])
    assert np.array_equal(np.stack(got), want)
    assert len(codec.encode(stream)) <= codec.max_bytes == max_snapshot_bytes(tiny)


def test_snapshot_refusals_are_clear(tiny, tiny_runners):
    from flowact.engine import StreamEngine

    codec = SnapshotCodec(tiny, KEY.encode(), field="RESUME")
    engine = StreamEngine(tiny, tiny_runners, capacity=2)
    stream = engine.start(ref_image(tiny), seed=1, prompt="thinking")
    engine.step([stream], speech_chunks(1))
    blob = codec.encode(stream)

    def refusal(data: bytes, using: SnapshotCodec = codec) -> str:
        with pytest.raises(SnapshotError) as e:
            using.restore(engine, data)
        assert str(e.value).startswith("RESUME: ")
        assert engine.pool.free == [1]  # a refused snapshot holds no slot
        return str(e.value)

    for i in (0, 9, len(blob) // 2, len(blob) - 1):  # magic, header, payload, signature
        flipped = bytearray(blob)
        flipped[i] ^= 0x10
        assert re.search("integrity check failed|bad magic", refusal(bytes(flipped)))
    assert "integrity check failed" in refusal(blob[:-100] + blob[-32:])
    assert "too short" in refusal(blob[:20])
    assert "more than" in refusal(blob + bytes(codec.max_bytes))
    assert "integrity check failed" in refusal(blob, SnapshotCodec(tiny, b"another deployment's key!", field="RESUME"))
    assert "version 3 is not supported (this server reads version 2)" in refusal(codec.encode(stream, version=3))
    other = tiny.with_(long_term_size=2)  # same name, other state layout
    assert "made for preset 'tiny' (fingerprint" in refusal(SnapshotCodec(other, KEY.encode()).encode(
        _stream_for(other)))
    assert key_from_env({}) is None
    with pytest.raises(ValueError, match=SNAPSHOT_KEY_ENV):
        key_from_env({SNAPSHOT_KEY_ENV: "short"})


def _stream_for(preset):
    """A started stream of a preset variant (its networks are not needed for a snapshot)."""
    import torch

    from flowact.state import StatePool

    state = StatePool(preset, 1).acquire()
    with torch.inference_mode():
        state.begin(torch.zeros(16, preset.latent_height, preset.latent_width), seed=0, prompt="idle")
    return state


def test_snapshot_padding_round_trip():
    size = max_snapshot_bytes(TINY)
    blob = b"FASN" + bytes([1, 0]) + (15).to_bytes(4, "little") + b'{"preset":"cpu"}'[:15] + bytes(50)
    assert peek_preset(blob) is None  # header cut: unreadable
    header = b'{"preset":"cpu"}'
    blob = b"FASN" + bytes([1, 0]) + len(header).to_bytes(4, "little") + header + bytes(100)
    assert peek_preset(padded(blob, size)) == "cpu"
    assert unpadded(b"not a snapshot", max_snapshot_bytes(TINY)) == b"not a snapshot"
