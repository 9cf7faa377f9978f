"""Streams belong to their owners, against a real tritonserver (tiny preset, CPU): unguessable client
ids, a refused START that sends nothing more, random ids required by the deployment, refused STARTs
that hold no scarce slot, and refusals that name their cause (eviction, another preset's snapshot).
Figures are printed; run with -s to see them."""

import collections
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import tritonclient.grpc as grpcclient

from conftest import ref_image, run_stream, speech_chunks, start_server, url
from flowact.client.stream import AvatarStream, StreamError, new_stream_id
from flowact.contract import MIN_RANDOM_ID_CHARS, REQUIRE_RANDOM_IDS_ENV, SNAPSHOT_KEY_ENV
from flowact.presets import get_preset
from flowact.snapshot import max_snapshot_bytes, padded

TINY = get_preset("tiny")
KEY = "test-snapshot-key-0123456789abcdef"
IDLE_TTL_S = 4.0  # Triton's own idle timeout is max(2 x TTL, TTL + 5 s) = 9 s


@pytest.fixture(scope="module")
def server(tmp_path_factory, onnx_dir):
    """Capacity 2, random ids required, snapshots on. The strangers here leave refused STARTs open (no
    hang-up), which holds Triton's shutdown for its exit timeout: 3 s, to keep the tests short."""
    srv = start_server(tmp_path_factory.mktemp("ownership"), onnx_dir, capacity=2, idle_ttl_s=IDLE_TTL_S,
                       extra_env={REQUIRE_RANDOM_IDS_ENV: "1", SNAPSHOT_KEY_ENV: KEY}, extra_args=["--exit-timeout-secs=3"])
    yield srv
    srv.stop()


class Requester:
    """One gRPC stream, one request in flight; each answer belongs to the request just sent."""

    def __init__(self, srv):
        self.client = grpcclient.InferenceServerClient(url(srv))
        self.answers = collections.deque()
        self.event = threading.Event()
        self.client.start_stream(callback=lambda result, error: (self.answers.append((result, error)), self.event.set()))

    def request(self, sid, inputs, start=False, end=False, timeout_s=30.0):
        """-> (seconds until the answer, error message or None)."""
        self.event.clear()
        t0 = time.monotonic()
        self.client.async_stream_infer("flowact", inputs, sequence_id=sid, sequence_start=start, sequence_end=end)
        assert self.event.wait(timeout_s), f"no answer within {timeout_s:.0f} s"
        result, error = self.answers.popleft()
        return time.monotonic() - t0, None if error is None else error.message()

    def close(self):
        self.client.stop_stream()
        self.client.close()


def tensor(name, array, dtype):
    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def audio_in(seed=0):
    return tensor("AUDIO", speech_chunks(1, seed)[0][None], "FP32")


def image_in(seed=0):
    return tensor("REF_IMAGE", ref_image(TINY, seed)[None], "UINT8")


def wait_active(srv, n, timeout_s=IDLE_TTL_S + 15):
    from conftest import metrics
    from flowact.serving.cli import metric_value

    deadline = time.monotonic() + timeout_s
    while (metric_value(metrics(srv), "flowact_active_streams") or 0) != n:
        assert time.monotonic() < deadline, f"active streams never became {n}"
        time.sleep(0.1)


# --- no server --------------------------------------------------------------------------------------


def test_client_ids_are_128_random_bits():
    ids = {new_stream_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


# --- against the server ------------------------------------------------------------------------------


def test_required_random_ids_refuse_integer_and_short_ids(server):
    req = Requester(server)
    try:
        for sid in (12345, "short-id", "y" * (MIN_RANDOM_ID_CHARS - 1)):
            _, error = req.request(sid, [audio_in(), image_in()], start=True, end=True)
            assert error is not None and "requires unguessable stream ids" in error, (sid, error)
        _, error = req.request(new_stream_id(), [audio_in(), image_in()], start=True, end=True)
        assert error is None
    finally:
        req.close()


def test_a_refused_start_leaves_the_owners_frames_identical(server, tiny, tiny_runners):
    """The shipped client waits for its START's answer: refused ("already active"), it sends nothing
    more into the id, so the owner's stream gets no foreign chunk and no END."""
    chunks = speech_chunks(8, seed=4)
    owner_id = new_stream_id()
    got = {}
    first = threading.Event()

    def owner():
        with AvatarStream(url(server), stream_id=owner_id) as stream:
            got["result"] = stream.run(ref_image(tiny, 4), chunks, seed=4, realtime=True,
                                       on_chunk=lambda frames: first.set())

    thread = threading.Thread(target=owner)
    thread.start()
    assert first.wait(30)
    for _ in range(2):  # an intruder with the same id, as fast as it can, ending its stream
        with AvatarStream(url(server), stream_id=owner_id) as intruder:
            with pytest.raises(StreamError, match="already active"):
                intruder.run(ref_image(tiny, 7), speech_chunks(3, seed=7), seed=7)
    thread.join(timeout=60)
    assert len(got["result"].frames) == 8
    want = run_stream(tiny, tiny_runners, 4, chunks, ref_image(tiny, 4))
    diff = np.abs(np.stack(got["result"].frames).astype(int) - want.astype(int))
    assert diff.max() <= 1 and diff.mean() < 1e-3, f"max {diff.max()} mean {diff.mean():.2e}"


def test_refused_starts_without_end_delay_no_later_start(server):
    """100 STARTs refused at capacity that never END, then a client retrying at capacity in a loop:
    every answer (and the next legitimate START) comes within 1 s."""
    wait_active(server, 0)
    req = Requester(server)
    holders = [new_stream_id(), new_stream_id()]
    try:
        for holder in holders:  # capacity 2: full
            assert req.request(holder, [audio_in(), image_in()], start=True)[1] is None
        burst = []
        for _ in range(100):
            seconds, error = req.request(new_stream_id(), [audio_in(), image_in()], start=True)
            assert error is not None and "at capacity" in error, error
            burst.append(seconds)
        for holder in holders:  # keep the holders within their idle TTL
            assert req.request(holder, [audio_in()])[1] is None
        retries = []
        for _ in range(100):  # the retry loop: a fresh id each time, no END
            seconds, error = req.request(new_stream_id(), [audio_in(), image_in()], start=True)
            assert "at capacity" in error
            retries.append(seconds)
        refused_now, error = req.request(new_stream_id(), [audio_in(), image_in()], start=True)
        assert "at capacity" in error
        for holder in holders:
            assert req.request(holder, [audio_in()], end=True)[1] is None
        seconds, error = req.request(new_stream_id(), [audio_in(), image_in()], start=True, end=True)
        assert error is None, error
        print(f"\nrefused STARTs: burst max {max(burst) * 1000:.0f} ms, retry loop max {max(retries) * 1000:.0f} ms; "
              f"after 200: refused in {refused_now * 1000:.0f} ms, next START admitted in {seconds * 1000:.0f} ms")
        assert max(burst) < 1.0 and max(retries) < 1.0 and refused_now < 1.0 and seconds < 1.0
    finally:
        req.close()


def test_an_evicted_streams_next_request_names_the_eviction(server):
    wait_active(server, 0)
    req = Requester(server)
    sid = new_stream_id()
    try:
        assert req.request(sid, [audio_in(), image_in()], start=True)[1] is None
        wait_active(server, 0)  # the model's TTL evicted it; Triton still knows the sequence
        _, error = req.request(sid, [audio_in()])
        assert error is not None and f"stream '{sid}' was evicted after" in error and "idle" in error, error
    finally:
        req.close()


def test_a_resume_from_another_preset_names_the_preset(server, tiny):
    """RESUME has one fixed size per preset: Triton refuses another size before the stream model; the
    shipped client names the preset the snapshot was made for."""
    header = b'{"preset":"cpu","fingerprint":"0"}'
    other = b"FASN" + bytes([1, 0]) + len(header).to_bytes(4, "little") + header + bytes(206_000)
    with AvatarStream(url(server)) as stream:
        with pytest.raises(StreamError, match="RESUME: a snapshot of preset 'cpu'"):
            stream.run(None, speech_chunks(1), snapshot=other)
    with AvatarStream(url(server)) as stream:  # same size as this preset's snapshots: the model names it
        with pytest.raises(StreamError, match=r"RESUME: a snapshot of preset 'cpu' cannot resume on this server \(preset 'tiny'\)"):
            stream.run(None, speech_chunks(1), snapshot=padded(other[:20_000], max_snapshot_bytes(tiny)))


def test_two_stream_clis_at_once_get_their_own_frames(server, tmp_path):
    import av

    audio = tmp_path / "speech.wav"
    sf.write(audio, np.concatenate(speech_chunks(5)), 16_000)

    def stream_cli(name: str, seed: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "flowact.cli", "stream", "--url", url(server), "--audio", str(audio),
                                 "--seed", str(seed), "--out", str(tmp_path / f"{name}.mp4")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def frames(name: str) -> np.ndarray:
        with av.open(str(tmp_path / f"{name}.mp4")) as f:
            return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])

    ref = stream_cli("alone", 1)
    assert ref.wait(timeout=120) == 0, ref.stdout.read()
    both = [stream_cli("a", 1), stream_cli("b", 2)]  # at once: before, both took stream id 1
    outputs = [p.communicate(timeout=120)[0] for p in both]
    assert [p.returncode for p in both] == [0, 0], outputs
    alone = frames("alone")
    # Its own frames, undisturbed: streams batched together match their solo runs within one level
    # before H.264 (test_core: batched vs per-stream), so compare the decoded videos by error size.
    own, other = (np.abs(frames(n).astype(int) - alone.astype(int)).mean() for n in ("a", "b"))
    print(f"mean |a - alone| {own:.3f} levels, mean |b - alone| {other:.3f} levels")
    assert len(frames("a")) == len(frames("b")) == len(alone)
    assert own < 3.0 and other > 5 * max(own, 0.5)  # b is another stream: far from a's solo run
