"""flowact.serving.streams (model_repository/streams.py) without a server: parse_request, stream ids, StreamRegistry."""

import secrets

import numpy as np
import pytest

from conftest import ref_image, speech_chunks
from flowact.contract import MAX_PROMPT_BYTES, MIN_RANDOM_ID_CHARS
from flowact.validate import InputError
from flowact.presets import SAMPLES_PER_CHUNK, get_preset
from flowact.serving.streams import ResumeRequest, StartRequest, StreamRegistry, check_stream_id, parse_request
from flowact.snapshot import max_snapshot_bytes

TINY = get_preset("tiny")


def _parse(start=True, end=False, **inputs):
    base = {"AUDIO": speech_chunks(1)[0][None], "REF_IMAGE": ref_image(TINY)[None] if start else None}
    return parse_request({**base, **inputs}, start, end, TINY, max_snapshot_bytes(TINY))


@pytest.mark.parametrize("inputs, start, message", [
    ({"AUDIO": None}, True, "AUDIO: required"),
    ({"AUDIO": np.zeros((2, SAMPLES_PER_CHUNK), np.float32)}, True, "AUDIO: one chunk per request, got a batch of 2"),
    ({"AUDIO": np.zeros((1, 100), np.float32)}, True, "AUDIO: shape must be (7680,)"),
    ({"AUDIO": np.zeros((1, SAMPLES_PER_CHUNK), np.float64)}, True, "AUDIO: dtype must be float32"),
    ({"AUDIO": np.full((1, SAMPLES_PER_CHUNK), np.inf, np.float32)}, True, "AUDIO: contains NaN or Inf"),
    ({"AUDIO": np.full((1, SAMPLES_PER_CHUNK), 1e6, np.float32)}, True, "AUDIO: sample magnitude"),
    ({"REF_IMAGE": None}, True, "REF_IMAGE: required with START"),
    ({"REF_IMAGE": np.zeros((1, 0, 64, 3), np.uint8)}, True, "REF_IMAGE: shape must be (64, 64, 3)"),
    ({"REF_IMAGE": np.zeros((1, 100000, 1, 3), np.uint8)}, True, "REF_IMAGE: shape must be (64, 64, 3)"),
    ({"REF_IMAGE": ref_image(TINY)[None]}, False, "REF_IMAGE: only allowed with START"),
    ({"SEED": np.array([[-1]], np.int64)}, True, "SEED: -1 is out of range [0, 9223372036854775807]"),
    ({"SEED": np.array([[1.5]], np.float32)}, True, "SEED: expected an integer"),
    ({"SEED": np.array([[1, 2]], np.int64)}, True, "SEED: expected one value, got 2"),
    ({"SEED": np.array([[3]], np.int64)}, False, "SEED: only allowed with START"),
    ({"PROMPT": np.array([[b"\xff\xfe"]], object)}, True, "PROMPT: not valid UTF-8"),
    ({"PROMPT": np.array([[b"x" * (MAX_PROMPT_BYTES + 1)]], object)}, True, "PROMPT: 1025 bytes is longer than 1024"),
    ({"PROMPT": np.array([[b"x" * 100_000]], object)}, True, "PROMPT: 100000 bytes is far too long"),
    ({"PROMPT": np.array([[b"nod\x00"]], object)}, True, "PROMPT: control character U+0000"),
    ({"PROMPT": np.array([[7]], np.int64)}, True, "PROMPT: expected a string"),
    ({"BEHAVIOUR": np.array([[b"dancing"]], object)}, True, "BEHAVIOUR: unknown behaviour 'dancing': must be one of"),
    ({"BEHAVIOUR": np.array([[b"idle"]], object), "PROMPT": np.array([[b"wave"]], object)}, True,
     "BEHAVIOUR and PROMPT: send one"),
    ({"WANT_SNAPSHOT": np.array([[1]], np.int32)}, False, "WANT_SNAPSHOT: expected a bool"),
    ({"RESUME": np.zeros((1, 0), np.uint8)}, True, "RESUME: 0 bytes is outside"),
    ({"RESUME": np.zeros((1, 10**6), np.uint8)}, True, "RESUME: 1000000 bytes is outside"),
    ({"RESUME": np.zeros((1, 8), np.float32)}, True, "RESUME: expected uint8 bytes"),
    ({"RESUME": np.zeros((1, 8), np.uint8)}, False, "RESUME: only allowed with START"),
])
def test_request_rules_name_the_field(inputs, start, message):
    with pytest.raises(InputError) as e:
        _parse(start=start, **inputs)
    assert message in str(e.value)


def test_request_contract_accepts_what_it_documents():
    req = _parse(BEHAVIOUR=np.array([[b"listening"]], object), SEED=np.array([[2**63 - 1]], np.int64),
                 WANT_SNAPSHOT=np.array([[True]]))
    assert isinstance(req.begin, StartRequest) and type(req.begin.seed) is int
    assert (req.prompt, req.begin.prompt, req.begin.seed, req.want_snapshot) == ("listening", "listening", 2**63 - 1, True)
    assert _parse().begin.prompt == "speaking" and _parse().prompt is None  # the default text, only at START
    req = _parse(start=False, end=True, PROMPT=np.array([["raise the left hand\tslowly".encode()]], object))
    assert (req.prompt, req.end, req.begin) == ("raise the left hand\tslowly", True, None)
    req = _parse(REF_IMAGE=None, RESUME=np.ones((1, 64), np.uint8))  # the signature is checked when restoring
    assert req.begin == ResumeRequest(bytes([1] * 64))


def test_random_id_rule():
    check_stream_id(7, require_random=False)
    check_stream_id(secrets.token_hex(16), require_random=True)
    for sid, part in ((7, "got an integer"), ("abc", "got a 3-character string"),
                      ("x" * (MIN_RANDOM_ID_CHARS - 1), f"got a {MIN_RANDOM_ID_CHARS - 1}-character string"),
                      ("0" * MIN_RANDOM_ID_CHARS, "about 0 bits"), ("a" * 40, "about 0 bits"),
                      ("stream-1".rjust(MIN_RANDOM_ID_CHARS), "repeated or padded"),
                      ("stream-1".ljust(MIN_RANDOM_ID_CHARS, "0"), "about 50 bits")):
        with pytest.raises(InputError, match=f"requires unguessable stream ids.*{part}"):
            check_stream_id(sid, require_random=True)


def test_registry_names_eviction_and_stop(tmp_path):
    now = [0.0]
    drain = tmp_path / "draining"
    reg = StreamRegistry(capacity=2, idle_ttl_s=30.0, drain_file=drain, clock=lambda: now[0])
    reg.admit("a", object)
    reg.admit("b", object)
    now[0] = 31.0
    reg.get("b")  # b stays alive
    assert reg.evict_idle() == ["a"]
    with pytest.raises(InputError, match=r"stream 'a' was evicted after 31.0 s idle \(idle TTL 30 s\)"):
        reg.get("a")
    drain.write_text("stopping")
    with pytest.raises(InputError, match="server is stopping: no new streams"):
        reg.admit("c", object)
    reg.get("b")  # active streams go on while the server drains
    drain.write_text("evacuate")
    with pytest.raises(InputError, match=r"server is stopping: stream 'b' ended here .*RESUME"):
        reg.get("b")
    with pytest.raises(InputError, match="stream 'b' was ended: server is stopping"):
        reg.get("b")
    assert reg.active() == 0 and reg.counters.ended == 1 and reg.counters.evicted == 1
    drain.write_text("")  # `flowact drain` (preStop)
    with pytest.raises(InputError, match="server is draining"):
        reg.admit("d", object)
    drain.unlink()
    reg.admit("a", object)  # a START forgets why the id was gone
    assert "a" not in reg.gone
