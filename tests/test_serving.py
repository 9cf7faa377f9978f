"""End to end against a real tritonserver (the nvidia-pytriton binary), tiny preset, CPU."""

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from conftest import metrics, ref_image, run_stream, speech_chunks, start_server, url
from flowact.client.live import LiveStream
from flowact.client.stream import AvatarStream, StreamError
from flowact.serving.cli import metric_value
from flowact.serving.processes import group_alive, shm_regions

IDLE_TTL_S = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory, onnx_dir):
    srv = start_server(tmp_path_factory.mktemp("serving"), onnx_dir, idle_ttl_s=IDLE_TTL_S)
    yield srv
    srv.stop()


def assert_frames_match(got: list[np.ndarray], want: np.ndarray) -> None:
    diff = np.abs(np.stack(got).astype(int) - want.astype(int))
    assert diff.max() <= 1 and diff.mean() < 1e-3, f"max {diff.max()} mean {diff.mean():.2e}"


def test_configs_parse_with_tritons_protobuf(server):
    repo = Path(server.repository)
    configs = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        configs[path.parent.name] = text_format.Parse(path.read_text(), mc.ModelConfig())
    assert set(configs) == {"flowact", "stream", "vae_decoder"}  # the other networks run inside `stream`
    stream = configs["stream"]
    assert stream.sequence_batching.HasField("oldest")
    assert stream.sequence_batching.oldest.max_candidate_sequences > stream.max_batch_size == 12
    assert [s.model_name for s in configs["flowact"].ensemble_scheduling.step] == ["stream", "vae_decoder"]


def test_grpc_frames_equal_in_process(server, tiny, tiny_runners):
    chunks = speech_chunks(6, seed=4)
    with AvatarStream(url(server), stream_id=101) as stream:
        result = stream.run(ref_image(tiny, 4), chunks, seed=4)
    assert_frames_match(result.frames, run_stream(tiny, tiny_runners, 4, chunks, ref_image(tiny, 4)))


def test_eight_concurrent_streams_no_cross_talk(server, tiny, tiny_runners):
    ids = [201, 202, 203, 204, "alice", "bob", "carol", "dave"]  # integer and string sequence ids
    results, errors = {}, []

    def run(i, sid):
        try:
            with AvatarStream(url(server), stream_id=sid) as stream:
                results[sid] = stream.run(ref_image(tiny, i), speech_chunks(5, seed=i), seed=i)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, sid)) for i, sid in enumerate(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i, sid in enumerate(ids):
        assert_frames_match(results[sid].frames, run_stream(tiny, tiny_runners, i, speech_chunks(5, seed=i), ref_image(tiny, i)))


def send_raw(srv, sid, inputs, start=False, end=False) -> str | None:
    """One request on its own gRPC stream -> the server's error message, or None on success."""
    box = []
    client = grpcclient.InferenceServerClient(url(srv))
    client.start_stream(callback=lambda result, error: box.append(error))
    client.async_stream_infer("flowact", inputs, sequence_id=sid, sequence_start=start, sequence_end=end)
    deadline = time.monotonic() + 30
    while not box and time.monotonic() < deadline:
        time.sleep(0.01)
    client.stop_stream()
    client.close()
    assert box, "no response"
    return None if box[0] is None else box[0].message()


def tensor(name, array, dtype):
    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def test_bad_requests_get_clear_errors_while_a_stream_runs(server, tiny, tiny_runners):
    healthy_chunks = speech_chunks(12, seed=9)
    healthy = {}

    def run_healthy():
        with AvatarStream(url(server), stream_id=301) as stream:
            healthy["result"] = stream.run(ref_image(tiny, 9), healthy_chunks, seed=9, realtime=True)

    thread = threading.Thread(target=run_healthy)
    thread.start()
    good_audio = speech_chunks(1)[0][None]  # (1, 7680)
    image = ref_image(tiny)[None]  # (1, H, W, 3)
    audio_in = tensor("AUDIO", good_audio, "FP32")
    image_in = tensor("REF_IMAGE", image, "UINT8")

    assert "START" in send_raw(server, 302, [audio_in])  # no START for an unknown stream
    assert send_raw(server, 303, [audio_in, image_in], start=True, end=True) is None
    assert "START" in send_raw(server, 303, [audio_in])  # id reused after END
    assert "AUDIO" in send_raw(server, 304, [tensor("AUDIO", good_audio[:, :100], "FP32"), image_in], start=True)
    assert "AUDIO" in send_raw(server, 305, [tensor("AUDIO", good_audio.astype(np.float64), "FP64"), image_in], start=True)
    nan = good_audio.copy()
    nan[0, 5] = np.nan
    assert "NaN" in send_raw(server, 306, [tensor("AUDIO", nan, "FP32"), image_in], start=True)
    assert "REF_IMAGE: required with START" in send_raw(server, 307, [audio_in], start=True)
    assert "REF_IMAGE" in send_raw(server, 308, [audio_in, tensor("REF_IMAGE", image[:, :32], "UINT8")], start=True)
    bad_prompt = tensor("PROMPT", np.array([[b"\xff\xfe"]], dtype=np.object_), "BYTES")
    assert "PROMPT: not valid UTF-8" in send_raw(server, 309, [audio_in, image_in, bad_prompt], start=True)

    thread.join(timeout=60)
    assert_frames_match(healthy["result"].frames, run_stream(tiny, tiny_runners, 9, healthy_chunks, ref_image(tiny, 9)))
    with AvatarStream(url(server), stream_id=306) as stream:  # a refused START left no state behind
        assert len(stream.run(ref_image(tiny), speech_chunks(1), seed=0).frames) == 1


def test_idle_streams_are_evicted(server, tiny):
    stream = AvatarStream(url(server), stream_id=401)
    stream.run(ref_image(tiny), speech_chunks(1), seed=0, end=False)
    stream.client.close()  # a client that crashed: no END, no hang-up
    assert metric_value(metrics(server), "flowact_active_streams") >= 1
    deadline = time.monotonic() + IDLE_TTL_S + 10
    while time.monotonic() < deadline and metric_value(metrics(server), "flowact_active_streams") != 0:
        time.sleep(0.25)
    text = metrics(server)
    assert metric_value(text, "flowact_active_streams") == 0
    assert metric_value(text, "flowact_streams_evicted_total") >= 1
    assert metric_value(text, "flowact_chunks_total") >= 1
    assert metric_value(text, "flowact_stream_capacity") == 12


def test_hung_up_streams_free_their_slots_at_once_and_stop_leaves_nothing(tmp_path, onnx_dir, tiny):
    """Refused STARTs and streams given up while open are hung up by the clients (END without AUDIO): the
    slots are free at once, and Triton, which counts every open sequence as an in-flight inference,
    stops without waiting for its exit timeout."""
    before = shm_regions()
    srv = start_server(tmp_path, onnx_dir, capacity=2)
    with AvatarStream(url(srv), stream_id=1) as stream:
        stream.run(ref_image(tiny), speech_chunks(1), seed=0)
    held = [AvatarStream(url(srv)) for _ in range(2)]
    for stream in held:
        stream.run(ref_image(tiny), speech_chunks(2), seed=0, end=False)  # open, at capacity
    refused = [AvatarStream(url(srv)), AvatarStream(url(srv), want_snapshots=True)]
    for stream, why in zip(refused, ("at capacity", "snapshots are disabled")):
        with pytest.raises(StreamError, match=why):
            stream.run(ref_image(tiny), speech_chunks(2), seed=0)
        stream.close()
    live = LiveStream(url(srv), ref_image(tiny), lambda *frames: None, failover=None)  # the edge's and agents' client
    live.put(0, speech_chunks(1)[0], None, None)
    with pytest.raises(StreamError, match="at capacity"):
        asyncio.run(live.run())
    text = metrics(srv)
    assert metric_value(text, "flowact_active_streams") == 2 and metric_value(text, "flowact_streams_ended_total") == 1
    for stream in held:
        stream.close()
    text = metrics(srv)
    assert metric_value(text, "flowact_active_streams") == 0 and metric_value(text, "flowact_streams_ended_total") == 3
    assert metric_value(text, "flowact_requests_invalid_total") == 1  # the snapshot refusal; hang-ups are not invalid
    pgid = srv.process.pid
    assert shm_regions() - before  # the python backend uses shared memory while running
    srv.stop()
    assert not group_alive(pgid)
    assert shm_regions() - before == set()
    waited = [line for line in srv.log_lines if "in-flight inferences\"" in line and "has" in line]
    assert not waited, waited  # Triton had no open sequence to wait for
