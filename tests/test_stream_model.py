"""The Triton `stream` model's glue (model_repository/stream/1/model.py) without a server: its real
`initialize` and `execute`, on the config the repository renderer writes, through the small fake of
`triton_python_backend_utils` in tests/triton_fake.py. The same requests through a real tritonserver
are tests/test_serving.py and tests/test_reliability.py."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format

import triton_fake
from conftest import ref_image, run_stream, speech_chunks
from flowact.contract import (ACTIVE_STREAMS, AUDIO, CHUNK_INDEX, CHUNKS_TOTAL, END, FRAMES, HUNG_UP, METRICS,
                              REF_IMAGE, REQUESTS_INVALID, RESUME, SEED, SNAPSHOT, SNAPSHOT_KEY_ENV, START, STREAMS_ENDED,
                              STREAMS_REJECTED, WANT_SNAPSHOT)
from flowact.serving.streams import Counters

MODEL_PY = Path(__file__).parents[1] / "model_repository" / "stream" / "1" / "model.py"
KEY = "a test deployment key, 32 bytes!!"
OLD_SNAPSHOT = Path(__file__).parent / "data" / "snapshot_v2_tiny_43469b7.bin"  # made before the stream engine


def initialize(config):
    """The stream model (model.py as the repository ships it) initialized on a rendered ModelConfig."""
    pb = triton_fake.install()
    spec = importlib.util.spec_from_file_location("stream_model_under_test", MODEL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)  # as Triton passes it: "" included
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config)})
    return model, pb


def load_model(tiny, capacity: int = 2):
    """The stream model initialized on the serial (FRAMES) tiny config, torch runtime, seeded weights (= tiny_runners)."""
    from flowact.serving.repository import Pipeline, RepositoryOptions, Target, stream_config

    opts = RepositoryOptions(capacity=capacity, idle_ttl_s=30.0, pipeline=Pipeline.SERIAL, engine_threads=1, device="cpu")
    return initialize(stream_config(tiny, opts, Target.TORCH))


@pytest.fixture
def model(tiny):
    model, _ = load_model(tiny)
    yield model
    model.finalize()


def request(sid, audio, start=False, end=False, **extra):
    tensors = {AUDIO: audio[None], START: np.array([[int(start)]], np.int32), END: np.array([[int(end)]], np.int32)}
    return triton_fake.InferenceRequest(sid, {**tensors, **{k: v for k, v in extra.items() if v is not None}})


def start(sid, tiny, audio, seed=0, **extra):
    return request(sid, audio, start=True, **{REF_IMAGE: ref_image(tiny, seed)[None], SEED: np.array([[seed]]), **extra})


def frames_of(response) -> np.ndarray:
    assert not response.has_error(), response.error().message()
    return response.outputs[FRAMES][0]  # (12, H, W, 3)


def metric(name: str) -> float:
    return sum(m.value for m in triton_fake.MetricFamily.families[name].metrics)


def test_execute_frames_equal_in_process_and_batch_isolates_bad_requests(model, tiny, tiny_runners):
    a, c = speech_chunks(3, seed=1), speech_chunks(3, seed=2)
    bad = request("b", a[0], start=True, **{REF_IMAGE: np.zeros((1, 8, 8, 3), np.uint8)})
    first = model.execute([start("a", tiny, a[0], seed=1), bad, start("c", tiny, c[0], seed=2)])
    assert first[1].error().message().startswith("REF_IMAGE: shape must be (64, 64, 3)")
    got = {"a": [frames_of(first[0])], "c": [frames_of(first[2])]}
    for k in (1, 2):
        out = model.execute([request("a", a[k], end=k == 2), request("c", c[k])])
        got["a"].append(frames_of(out[0]))
        got["c"].append(frames_of(out[1]))
        assert [int(r.outputs[CHUNK_INDEX][0, 0]) for r in out] == [k, k]
    for sid, seed, chunks in (("a", 1, a), ("c", 2, c)):
        want = run_stream(tiny, tiny_runners, seed, chunks, ref_image(tiny, seed))
        assert np.abs(np.stack(got[sid]).astype(int) - want.astype(int)).max() <= 1
    assert model.registry.active() == 1 and len(model.engine.pool.free) == 1  # a ended; b never held a slot
    assert (metric(CHUNKS_TOTAL), metric(REQUESTS_INVALID), metric(ACTIVE_STREAMS)) == (6, 1, 1)


def test_capacity_end_and_unknown_streams(model, tiny):
    audio = speech_chunks(1)[0]
    out = model.execute([start("a", tiny, audio), start("b", tiny, audio), start("c", tiny, audio)])
    assert [r.has_error() for r in out] == [False, False, True]
    assert "at capacity (2/2 streams)" in out[2].error().message()
    out = model.execute([request("a", audio, end=True), request("zz", audio), request("b", audio, **{SEED: np.array([[1]])})])
    assert not out[0].has_error()
    assert "unknown stream 'zz'" in out[1].error().message()
    assert out[2].error().message() == "SEED: only allowed with START (the first request of a stream)"
    assert not model.execute([start("c", tiny, audio)])[0].has_error()  # a's slot is free again
    assert model.registry.active() == 2 and metric(STREAMS_REJECTED) == 1


def test_every_counter_metric_is_exported_from_one_counter():
    values = Counters(chunks=3, ended=1).metric_values()
    assert set(values) == {name for name, (kind, _) in METRICS.items() if kind == "COUNTER"}
    assert values[CHUNKS_TOTAL] == 3 and values[STREAMS_ENDED] == 1 and values[STREAMS_REJECTED] == 0


def test_a_failed_engine_call_ends_its_streams_and_frees_their_slots(model, tiny, monkeypatch):
    audio = speech_chunks(1)[0]
    model.execute([start("a", tiny, audio), start("b", tiny, audio)])

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(model.engine, "denoise", broken)
    out = model.execute([request("a", audio), request("b", audio)])
    assert [r.error().message() for r in out] == [f"chunk generation failed, stream {s!r} ended: boom" for s in "ab"]
    assert model.registry.active() == 0 and sorted(model.engine.pool.free) == [0, 1]
    assert metric(STREAMS_ENDED) == 2


def test_snapshots_resume_on_another_instance_and_from_before_the_engine(tiny, tiny_runners, monkeypatch):
    audio = speech_chunks(5, seed=4)
    monkeypatch.delenv(SNAPSHOT_KEY_ENV, raising=False)
    keyless, _ = load_model(tiny)
    refused = keyless.execute([start("a", tiny, audio[0], **{WANT_SNAPSHOT: np.array([[True]])})])[0]
    assert "WANT_SNAPSHOT: snapshots are disabled on this server" in refused.error().message()
    keyless.finalize()

    monkeypatch.setenv(SNAPSHOT_KEY_ENV, KEY)
    one, _ = load_model(tiny)
    out = one.execute([start("a", tiny, audio[0], seed=4, **{WANT_SNAPSHOT: np.array([[True]])})])[0]
    blob = out.outputs[SNAPSHOT]  # (1, n) uint8, padded to the preset's fixed size
    assert blob.shape == (1, one.max_snapshot_bytes)
    other, _ = load_model(tiny)
    resumed = other.execute([request("a2", audio[1], start=True, **{RESUME: blob})])[0]
    assert int(resumed.outputs[CHUNK_INDEX][0, 0]) == 1
    want = run_stream(tiny, tiny_runners, 4, audio, ref_image(tiny, 4))
    assert np.abs(frames_of(resumed).astype(int) - want[1].astype(int)).max() <= 1

    # A snapshot the code before the stream engine made (tiny, seed 4, prompt "thinking", after 3 chunks)
    # resumes here and continues as an uninterrupted stream of today's engine does.
    from flowact.engine import StreamEngine

    engine = StreamEngine(tiny, tiny_runners)
    stream = engine.start(ref_image(tiny, 4), seed=4, prompt="thinking")
    for chunk in audio[:3]:
        engine.step([stream], [chunk])
    padded = np.zeros((1, other.max_snapshot_bytes), np.uint8)
    old = np.frombuffer(OLD_SNAPSHOT.read_bytes(), np.uint8)
    padded[0, :old.size] = old
    out = other.execute([request("old", audio[3], start=True, **{RESUME: padded})])[0]
    assert int(out.outputs[CHUNK_INDEX][0, 0]) == 3
    assert np.abs(frames_of(out).astype(int) - engine.step([stream], [audio[3]])[0].astype(int)).max() <= 1
    one.finalize()
    other.finalize()


def test_a_hang_up_ends_its_stream_without_generating_and_is_not_invalid(model, tiny):
    audio = speech_chunks(1)[0]
    model.execute([start("a", tiny, audio), start("b", tiny, audio)])
    controls = {START: np.array([[0]], np.int32), END: np.array([[1]], np.int32)}  # END, no AUDIO: a hang-up
    hang_up, never = triton_fake.InferenceRequest("a", controls), triton_fake.InferenceRequest("zz", controls)
    chunks_before = metric(CHUNKS_TOTAL)
    out = model.execute([hang_up, request("b", audio), never])
    assert [out[i].error().message() for i in (0, 2)] == [f"stream 'a': {HUNG_UP}", f"stream 'zz': {HUNG_UP}"]
    assert not out[1].has_error() and metric(CHUNKS_TOTAL) == chunks_before + 1  # b's chunk only
    assert model.registry.active() == 1 and len(model.engine.pool.free) == 1  # a's slot is free
    assert metric(STREAMS_ENDED) == 1 and metric(REQUESTS_INVALID) == 0
    no_audio_start = triton_fake.InferenceRequest("c", {**controls, START: np.array([[1]], np.int32),
                                                        REF_IMAGE: ref_image(tiny)[None]})
    assert model.execute([no_audio_start])[0].error().message().startswith(f"{AUDIO}: required")
