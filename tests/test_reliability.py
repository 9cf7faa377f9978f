"""Reliability and security against a real tritonserver (tiny preset, CPU): hostile input, overload,
leaks, faults, resumable streams, and what a client may not do. Every loop is bounded in count
and time. Figures (fuzz outcomes, RSS) are printed; run with -s to see them.

Two servers: `server` (capacity CAPACITY, short idle TTL) for input, load and leak tests, and
`spare` (same snapshot key, restarts itself when a python stub dies) for restarts and faults.
"""

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from conftest import metrics, ref_image, run_stream, speech_chunks, start_server, url
from flowact.client.stream import AvatarStream, StreamError
from flowact.contract import BEHAVIOURS, SNAPSHOT_KEY_ENV
from flowact.presets import SAMPLES_PER_CHUNK, get_preset
from flowact.serving.cli import metric_value
from flowact.serving.processes import free_ports, group_alive, group_rss, shm_regions
from flowact.serving.server import TritonServer
from flowact.snapshot import max_snapshot_bytes, padded

CAPACITY = 24
IDLE_TTL_S = 1.5
# The fuzz server's TTL: its healthy stream must survive any hiccup of this shared 2-core machine
# (a chunk answered late delays the stream's next request; past the TTL, Triton drops the sequence),
# while the fuzzed streams left open are still freed within the test.
FUZZ_IDLE_TTL_S = 6.0
KEY = "test-snapshot-key-0123456789abcdef"
FUZZ_EXAMPLES = int(os.environ.get("FLOWACT_FUZZ_EXAMPLES", "2000"))
CLEANUP_STREAMS = int(os.environ.get("FLOWACT_CLEANUP_STREAMS", "1000"))
# Server process group (tritonserver, its guard and 2 stubs) growth over 1,000 streams after a warm-up.
# ONNX Runtime's arenas grow in steps to the largest batch seen, then stay: measured on 5 rounds of
# 1,000 streams after a warm-up, 860 -> 861 MiB. The warm-up uses more clients (larger batches).
RSS_GROWTH_BOUND_MIB = 32

TINY = get_preset("tiny")


# --- servers --------------------------------------------------------------------------------------


def launch(tmp: Path, onnx_dir: Path, capacity: int, idle_ttl_s: float = IDLE_TTL_S, **kwargs) -> TritonServer:
    return start_server(tmp, onnx_dir, capacity, idle_ttl_s, extra_env={SNAPSHOT_KEY_ENV: KEY}, **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory, onnx_dir):
    srv = launch(tmp_path_factory.mktemp("reliability"), onnx_dir, CAPACITY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, onnx_dir):
    srv = launch(tmp_path_factory.mktemp("fuzz"), onnx_dir, CAPACITY, FUZZ_IDLE_TTL_S)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def spare(tmp_path_factory, onnx_dir):
    # open streams hold Triton's shutdown for its whole exit timeout (10 s): 3 s here, to keep the tests short
    srv = launch(tmp_path_factory.mktemp("spare"), onnx_dir, 4, on_stub_exit="restart",
                 extra_args=["--exit-timeout-secs=3"])
    yield srv
    srv.stop()


def gauge(srv: TritonServer, name: str) -> float:
    return metric_value(metrics(srv), name) or 0.0


def wait_idle(srv: TritonServer, timeout_s: float = IDLE_TTL_S + 10) -> float:
    """Wait until the server holds no stream state -> seconds waited (fails the test otherwise)."""
    t0 = time.monotonic()
    while gauge(srv, "flowact_active_streams") != 0:
        assert time.monotonic() - t0 < timeout_s, f"streams still active after {timeout_s:.0f} s"
        time.sleep(0.1)
    return time.monotonic() - t0


def assert_accounted(srv: TritonServer) -> None:
    """Every admitted stream was freed exactly once: started = ended + evicted + active."""
    text = metrics(srv)
    started, ended, evicted = (metric_value(text, f"flowact_streams_{k}_total") or 0.0
                               for k in ("started", "ended", "evicted"))
    active = metric_value(text, "flowact_active_streams") or 0.0
    assert started == ended + evicted + active, (started, ended, evicted, active)


def assert_frames_match(got, want: np.ndarray) -> None:
    diff = np.abs(np.stack(got).astype(int) - want.astype(int))
    assert diff.max() <= 1 and diff.mean() < 1e-3, f"max {diff.max()} mean {diff.mean():.2e}"


# --- raw requests ---------------------------------------------------------------------------------


def tensor(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def text_tensor(name: str, value: bytes) -> grpcclient.InferInput:
    return tensor(name, np.array([[value]], dtype=np.object_), "BYTES")


class Requester:
    """One gRPC stream, one request in flight: each answer belongs to the request just sent."""

    def __init__(self, srv: TritonServer):
        self.client = grpcclient.InferenceServerClient(url(srv))
        self.answers = collections.deque()
        self.event = threading.Event()
        self.client.start_stream(callback=self._on)

    def _on(self, result, error):
        self.answers.append((result, error))
        self.event.set()

    def request(self, sid, inputs, start=False, end=False, outputs=("FRAMES",), timeout_s=30.0):
        """-> (result or None, error message or None)."""
        self.event.clear()
        self.client.async_stream_infer("flowact", inputs, sequence_id=sid, sequence_start=start, sequence_end=end,
                                       outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
        assert self.event.wait(timeout_s), f"no answer within {timeout_s:.0f} s: the server hangs"
        result, error = self.answers.popleft()
        return (None, error.message()) if error is not None else (result, None)

    def close(self):
        self.client.stop_stream()
        self.client.close()


def audio_in(seed: int = 0) -> grpcclient.InferInput:
    return tensor("AUDIO", speech_chunks(1, seed)[0][None], "FP32")


def image_in(seed: int = 0) -> grpcclient.InferInput:
    return tensor("REF_IMAGE", ref_image(TINY, seed)[None], "UINT8")


# --- against the server: input validation ---------------------------------------------------------


def test_invalid_requests_get_clear_errors_and_leave_nothing(server):
    wait_idle(server)
    invalid_before = gauge(server, "flowact_requests_invalid_total")
    audio, image = speech_chunks(1)[0][None], ref_image(TINY)[None]
    cases = [  # (inputs, start, end, expected message part); Triton's own checks first
        ([tensor("AUDIO", audio.astype(np.float64), "FP64"), image_in()], True, True, "AUDIO"),
        ([tensor("AUDIO", audio[:, :100], "FP32"), image_in()], True, True, "AUDIO"),
        ([audio_in(), tensor("REF_IMAGE", np.zeros((1, 0, 64, 3), np.uint8), "UINT8")], True, True, "REF_IMAGE"),
        ([audio_in(), tensor("REF_IMAGE", np.zeros((1, 2000, 50, 3), np.uint8), "UINT8")], True, True, "REF_IMAGE"),
        ([audio_in(), image_in(), tensor("SEED", np.array([[1]], np.int32), "INT32")], True, True, "SEED"),
        ([audio_in(), image_in(), tensor("BOGUS", np.zeros((1, 1), np.float32), "FP32")], True, True, "BOGUS"),
        ([tensor("AUDIO", np.repeat(audio, 2, 0), "FP32"), tensor("REF_IMAGE", np.repeat(image, 2, 0), "UINT8")],
         True, True, "must specify batch-size 1"),
        ([tensor("AUDIO", np.where(np.arange(SAMPLES_PER_CHUNK) == 5, np.nan, audio).astype(np.float32), "FP32"),
          image_in()], True, True, "AUDIO: contains NaN or Inf"),
        ([audio_in()], True, True, "REF_IMAGE: required with START"),
        ([audio_in(), image_in(), tensor("SEED", np.array([[-5]], np.int64), "INT64")], True, True,
         "SEED: -5 is out of range"),
        ([audio_in(), image_in(), text_tensor("PROMPT", b"\xc3\x28")], True, True, "PROMPT: not valid UTF-8"),
        ([audio_in(), image_in(), text_tensor("PROMPT", b"a" * 5000)], True, True, "PROMPT: 5000 bytes is far too long"),
        ([audio_in(), image_in(), text_tensor("BEHAVIOUR", b"yelling")], True, True, "BEHAVIOUR: unknown behaviour"),
        ([audio_in(), image_in(), tensor("RESUME", np.arange(64, dtype=np.uint8)[None], "UINT8")], True, True,
         "unexpected shape for input 'RESUME'"),  # RESUME has one fixed size per preset
        ([audio_in(), image_in(), tensor("RESUME", np.zeros((1, max_snapshot_bytes(TINY)), np.uint8), "UINT8")], True,
         True, "RESUME: not a flowact stream snapshot"),
    ]
    req = Requester(server)
    try:
        for k, (inputs, start, end, part) in enumerate(cases):
            result, error = req.request(7000 + k, inputs, start=start, end=end)
            assert error is not None and part in error, (k, error)
            assert "internal error" not in error
        ok, error = req.request(7100, [audio_in(), image_in(), text_tensor("BEHAVIOUR", b"thinking")], start=True, end=True)
        assert error is None and ok.as_numpy("FRAMES").shape == (1, 12, 64, 64, 3)
    finally:
        req.close()
    assert gauge(server, "flowact_requests_invalid_total") - invalid_before == 7  # the model's own refusals (cases 7-12 and 14)
    assert gauge(server, "flowact_active_streams") == 0
    assert_accounted(server)


# --- fuzz -----------------------------------------------------------------------------------------

DTYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32,
          "UINT8": np.uint8, "INT8": np.int8, "BOOL": np.bool_, "BYTES": np.object_}
NAMES = ("AUDIO", "REF_IMAGE", "SEED", "PROMPT", "BEHAVIOUR", "RESUME", "WANT_SNAPSHOT")
VALID = {"AUDIO": ("FP32", (1, SAMPLES_PER_CHUNK)), "REF_IMAGE": ("UINT8", (1, 64, 64, 3)), "SEED": ("INT64", (1, 1)),
         "PROMPT": ("BYTES", (1, 1)), "BEHAVIOUR": ("BYTES", (1, 1)), "RESUME": ("UINT8", (1, -1)),
         "WANT_SNAPSHOT": ("BOOL", (1, 1))}
MAX_FUZZ_ELEMENTS = 300_000


@st.composite
def fuzz_tensor(draw, name: str, snapshots: list[bytes]):
    """(name, dtype, array): usually the right dtype and shape with hostile contents, else anything."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype, shape = VALID[name]
    if rng.random() < 1 / 6:  # wrong dtype and/or shape
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 7, 64, 7680, 100_000]), min_size=1, max_size=4)))
        if int(np.prod(shape)) > MAX_FUZZ_ELEMENTS:
            shape = (1, 7, 64, 3)
    if dtype == "BYTES":
        choice = int(rng.choice(6, p=[.4, .2, .15, .1, .1, .05]))
        values = [draw(st.sampled_from(BEHAVIOURS)).encode(), draw(st.text(max_size=40)).encode(),
                  draw(st.binary(max_size=64)), b"x" * draw(st.integers(1000, 3000)), b"speaking\x00", b""][choice]
        array = np.empty(shape, dtype=np.object_)
        array.fill(values)
        return name, dtype, array
    if name == "RESUME" and dtype == "UINT8" and shape == (1, -1):
        blob = draw(st.sampled_from(snapshots)) if snapshots else b"\0" * 64
        how = int(rng.integers(0, 4))
        if how == 1:  # one flipped bit
            i = draw(st.integers(0, len(blob) - 1))
            blob = blob[:i] + bytes([blob[i] ^ (1 << draw(st.integers(0, 7)))]) + blob[i + 1:]
        elif how == 2:
            blob = blob[:draw(st.integers(1, len(blob)))]
        elif how == 3:
            blob = rng.integers(0, 256, draw(st.integers(1, 4096)), dtype=np.uint8).tobytes()
        return name, dtype, np.frombuffer(blob, np.uint8)[None].copy()
    shape = tuple(max(0, d) for d in shape)
    np_dtype = DTYPES[dtype]
    if np_dtype == np.bool_:
        return name, dtype, rng.integers(0, 2, shape).astype(np.bool_)
    if np.issubdtype(np_dtype, np.integer):
        info = np.iinfo(np_dtype)
        return name, dtype, rng.integers(info.min, info.max, shape, dtype=np_dtype, endpoint=True)
    scale = [1e-30, 0.1, 1.0, 300.0, 1e4, 1e30][rng.choice(6, p=[.05, .45, .3, .1, .05, .05])]
    array = (rng.standard_normal(shape) * scale).astype(np_dtype)
    if array.size and rng.random() < 0.2:
        array.reshape(-1)[rng.integers(0, array.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return name, dtype, array


@st.composite
def fuzz_request(draw, snapshots: list[bytes]):
    """(sequence id, START, END, tensors). Which inputs a request has is drawn with fixed odds (numpy,
    so that hypothesis's bias to boundary values stays in the tensors' contents): about a quarter of
    the requests pass validation and exercise the stream path with hostile but legal contents."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    start = rng.random() < 0.7
    odds = {"AUDIO": 0.95, "REF_IMAGE": 0.8 if start else 0.1, "RESUME": 0.15 if start else 0.05}
    names = [n for n in NAMES if rng.random() < odds.get(n, 0.2)]
    tensors = [draw(fuzz_tensor(n, snapshots)) for n in names]
    if rng.random() < 0.03:
        tensors.append(("EXTRA", "FP32", np.zeros((1, 3), np.float32)))
    # START: a fresh id, sometimes a reused one or 0 (invalid); otherwise mostly a fuzzed stream still open
    kinds = ["fresh", "reused", "zero"] if start else ["live", "fresh", "reused", "zero"]
    odds = [.9, .07, .03] if start else [.8, .1, .07, .03]
    kind = kinds[rng.choice(len(kinds), p=odds)]
    sid = {"fresh": 10**13 + int(rng.integers(0, 2**40)), "reused": [900001, 900002, "fz-a"][rng.integers(0, 3)],
           "zero": 0, "live": "live"}[kind]
    return sid, start, bool(rng.random() < 0.4), tensors


CATEGORIES = (  # (pattern, category) in order; the first match names an error
    (r"at capacity", "refused by the model: at capacity"),
    (r"already active|unknown stream", "refused by the model: stream id state"),
    (r"correlation ID|START flag|sequence batcher|batch-size", "refused by Triton: sequence/batch rules"),
    (r"input '(\w+)'", "refused by Triton: {}"),
    (r"^(?:in ensemble 'flowact', )?(\w+)(?: and \w+)?: ", "refused by the model: {}"),
)


def categorize(error: str | None) -> str:
    if error is None:
        return "ok (frames)"
    for pattern, category in CATEGORIES:
        m = re.search(pattern, error)
        if m:
            return category.format(*m.groups())
    return f"other: {error[:60]}"


def test_fuzzed_requests_never_crash_leak_or_disturb_a_healthy_stream(fuzz_server, tiny, tiny_runners):
    server = fuzz_server
    healthy_chunks = speech_chunks(400, seed=21)
    frames: list[np.ndarray] = []
    stop = threading.Event()
    failures: list[BaseException] = []

    def healthy():  # real-time paced, one chunk in flight, bounded by 400 chunks
        try:
            with AvatarStream(url(server), stream_id="healthy-fuzz", timeout_s=30) as stream:
                t0 = time.monotonic()
                for i, chunk in enumerate(healthy_chunks):
                    last = stop.is_set() or i == len(healthy_chunks) - 1
                    time.sleep(max(0.0, t0 + 0.48 * i - time.monotonic()))
                    stream.send(chunk, start=i == 0, end=last, image=ref_image(tiny, 21) if i == 0 else None,
                                seed=21 if i == 0 else None)
                    frames.append(stream.receive()[1])
                    if last:
                        return
        except BaseException as e:  # surfaced below
            failures.append(e)

    # a few real snapshots for the fuzzer to mutate
    with AvatarStream(url(server), stream_id="fuzz-snapshots", want_snapshots=True) as stream:
        stream.run(ref_image(tiny), speech_chunks(2), seed=0)
        snapshots = [stream.snapshot]
    thread = threading.Thread(target=healthy)
    thread.start()
    outcomes: collections.Counter = collections.Counter()
    examples: dict[str, str] = {}
    errors: list[str] = []
    live: list = []  # fuzzed streams started and not ended
    req = Requester(server)
    t0 = time.monotonic()
    try:
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(fuzz_request(snapshots))
        def fuzz(request):
            sid, start, end, tensors = request
            if sid == "live":  # a fuzzed stream that is still open, if any
                sid = live[-1] if live else 10**12
            inputs = [tensor(name, array, dtype) for name, dtype, array in tensors]
            result, error = req.request(sid, inputs, start=start, end=end)
            if error is None and start and not end:
                live.append(sid)
            elif end and sid in live:
                live.remove(sid)
            outcomes[categorize(error)] += 1
            examples.setdefault(categorize(error), (error or "")[:160])
            if error is not None:
                errors.append(error)
                assert error.strip() and "internal error" not in error and "Stub process" not in error, error
            else:
                assert result.as_numpy("FRAMES").shape == (1, 12, 64, 64, 3)
            assert server.process.poll() is None, "tritonserver died"
            assert not failures, (failures, server.failures)  # the launcher's account, if it stopped the server

        fuzz()
    finally:
        req.close()
        stop.set()
        thread.join(timeout=60)
    fuzz_s = time.monotonic() - t0
    assert not failures, (failures, server.failures)
    print(f"\nfuzz: {sum(outcomes.values())} requests in {fuzz_s:.0f} s; outcomes: {dict(outcomes.most_common())}; "
          f"healthy stream: {len(frames)} chunks")
    for category in sorted(examples):
        print(f"  {category}: {examples[category]}")
    assert len(frames) >= 10
    assert_frames_match(frames, run_stream(tiny, tiny_runners, 21, healthy_chunks[:len(frames)], ref_image(tiny, 21)))
    wait_idle(server, FUZZ_IDLE_TTL_S + 10)  # fuzzed streams left without END are freed by the idle TTL
    assert_accounted(server)
    assert server.dead_stubs() == [] and server.failures == []


# --- overload and cleanup -------------------------------------------------------------------------


def test_start_beyond_capacity_is_refused_at_once(server):
    wait_idle(server)
    rejected_before = gauge(server, "flowact_streams_rejected_total")
    req = Requester(server)
    try:
        for k in range(CAPACITY):
            assert req.request(8000 + k, [audio_in(k), image_in(k)], start=True)[1] is None
        refusals = []
        for k in range(2):  # capacity + 2
            t = time.monotonic()
            _, error = req.request(8100 + k, [audio_in(), image_in()], start=True)
            refusals.append((time.monotonic() - t, error))
        for seconds, error in refusals:
            assert error is not None and f"at capacity ({CAPACITY}/{CAPACITY} streams)" in error, error
            assert seconds < 1.0, f"refusal took {seconds:.2f} s"
        for k in range(CAPACITY):  # the admitted streams still get their chunks, at real-time speed
            t = time.monotonic()
            result, error = req.request(8000 + k, [audio_in(k)], end=True)
            assert error is None and time.monotonic() - t < 0.48, (k, error)
        _, error = req.request(8200, [audio_in(), image_in()], start=True, end=True)
        assert error is None  # room again
    finally:
        req.close()
    assert gauge(server, "flowact_streams_rejected_total") - rejected_before == 2
    wait_idle(server)
    assert_accounted(server)


def test_thousand_short_streams_leave_no_state_and_bounded_rss(server):
    """Short streams (1-2 chunks), half ended, half abandoned (no END; every 50th also drops its
    connection), four clients at once; afterwards no stream state and server RSS within a bound.
    Abandoned streams hold capacity until the idle TTL: STARTs refused "at capacity" are retried."""
    wait_idle(server)
    pgid = server.process.pid
    counters = collections.Counter()
    lock = threading.Lock()
    failures = []

    def run(worker: int, ids: range):
        req = Requester(server)
        try:
            for n, i in enumerate(ids):
                sid = 10**9 + i
                chunks, end = 1 + i % 2, (i // 2) % 2 == 0  # 1 or 2 chunks; END or abandon
                for c in range(chunks):
                    for attempt in range(100):
                        inputs = [audio_in(i % 7)] + ([image_in(i % 5)] if c == 0 else [])
                        _, error = req.request(sid, inputs, start=c == 0, end=end and c == chunks - 1)
                        if error is None or "at capacity" not in error:
                            break
                        with lock:
                            counters["at capacity, retried"] += 1
                        time.sleep(0.1)
                    assert error is None, (sid, error)
                with lock:
                    counters["ended" if end else "abandoned"] += 1
                if not end and n % 50 == 49:  # drop the connection too
                    req.close()
                    req = Requester(server)
                    with lock:
                        counters["connections dropped"] += 1
        except BaseException as e:
            failures.append(e)
        finally:
            req.close()

    def batch(first: int, count: int, workers: int):
        threads = [threading.Thread(target=run, args=(w, range(first + w, first + count, workers))) for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not failures, failures[0]

    warmup = 200
    batch(0, warmup, workers=8)
    wait_idle(server)
    rss_before, pss_before = group_rss(pgid), group_rss(pgid, proportional=True)
    t0 = time.monotonic()
    batch(warmup, CLEANUP_STREAMS, workers=4)
    seconds = time.monotonic() - t0
    waited = wait_idle(server)
    rss_after, pss_after = group_rss(pgid), group_rss(pgid, proportional=True)
    growth = (rss_after - rss_before) / 2**20
    print(f"\ncleanup: {CLEANUP_STREAMS} streams in {seconds:.0f} s ({dict(counters)}); active 0 after {waited:.1f} s; "
          f"server RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB ({growth:+.1f} MiB), "
          f"PSS {pss_before / 2**20:.0f} -> {pss_after / 2**20:.0f} MiB")
    assert counters["ended"] + counters["abandoned"] == warmup + CLEANUP_STREAMS
    assert_accounted(server)
    assert growth < RSS_GROWTH_BOUND_MIB


# --- faults ---------------------------------------------------------------------------------------

CLIENT = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import ref_image, speech_chunks
from flowact.client.stream import AvatarStream
from flowact.presets import get_preset
stream = AvatarStream({url!r}, stream_id="disconnect-me")
chunks = speech_chunks(100)
t0 = time.monotonic()
for i, chunk in enumerate(chunks):
    time.sleep(max(0.0, t0 + 0.48 * i - time.monotonic()))
    stream.send(chunk, start=i == 0, image=ref_image(get_preset("tiny")) if i == 0 else None)
    stream.receive()
    print("chunk", i, flush=True)
"""


def test_client_killed_mid_stream_frees_its_stream(server):
    """Triton 2.51 does not tell the model that a client went away (measured: requests of a cancelled
    gRPC stream still reach the stream model, none reports is_cancelled()), so the idle TTL frees it."""
    wait_idle(server)
    evicted_before = gauge(server, "flowact_streams_evicted_total")
    client = subprocess.Popen([sys.executable, "-c", CLIENT.format(tests=str(Path(__file__).parent), url=url(server))],
                              stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            assert client.stdout.readline().startswith("chunk"), "the client did not stream"
        assert gauge(server, "flowact_active_streams") == 1
    finally:
        client.kill()  # SIGKILL: no END, no clean gRPC shutdown
        client.wait(timeout=10)
    t = time.monotonic()
    waited = wait_idle(server)
    assert waited <= IDLE_TTL_S + 2, f"freed after {waited:.1f} s"
    assert gauge(server, "flowact_streams_evicted_total") - evicted_before == 1
    req = Requester(server)  # Triton's sequence slot is gone too: the id starts afresh
    try:
        assert req.request("disconnect-me", [audio_in(), image_in()], start=True, end=True)[1] is None
    finally:
        req.close()
    print(f"\ndisconnect: stream freed {time.monotonic() - t:.1f} s after the client was killed")


def snapshot_stream(srv, sid, chunks, seed=5):
    """Stream `chunks` with snapshots and leave it open -> (AvatarStream, frames)."""
    stream = AvatarStream(url(srv), stream_id=sid, want_snapshots=True, timeout_s=20)
    frames = []
    for i, chunk in enumerate(chunks):
        stream.send(chunk, start=i == 0, image=ref_image(TINY, seed) if i == 0 else None, seed=seed if i == 0 else None)
        frames.append(stream.receive()[1])
    return stream, frames


def test_stream_resumes_on_another_server_with_identical_frames(server, spare, tiny, tiny_runners):
    chunks = speech_chunks(8, seed=5)
    want = run_stream(tiny, tiny_runners, 5, chunks, ref_image(tiny, 5))
    stream, frames = snapshot_stream(server, "resume-me", chunks[:4])
    stream.close()  # the first server is "lost" here (its state is evicted by the TTL)
    with AvatarStream(url(spare), stream_id="resumed", want_snapshots=True) as resumed:
        result = resumed.run(None, chunks[4:], snapshot=stream.snapshot)
    assert_frames_match(frames + result.frames, want)
    assert gauge(spare, "flowact_streams_resumed_total") >= 1

    tampered = bytearray(stream.snapshot)
    tampered[len(tampered) // 3] ^= 1
    other_version = bytearray(stream.snapshot)
    other_version[4] = 9  # the version field; the signature then fails too, the version is checked first
    for blob, part in ((bytes(tampered), "RESUME: integrity check failed"),
                       (bytes(other_version), "RESUME: version 9 is not supported"),
                       (padded(stream.snapshot[:1000], len(stream.snapshot)), "RESUME: integrity check failed")):
        with AvatarStream(url(spare), want_snapshots=True) as bad:
            with pytest.raises(StreamError, match=part):
                bad.run(None, chunks[4:5], snapshot=blob)


def test_server_restart_gives_a_clear_error_and_the_stream_resumes(spare, tiny, tiny_runners):
    chunks = speech_chunks(6, seed=5)
    want = run_stream(tiny, tiny_runners, 5, chunks, ref_image(tiny, 5))
    stream, frames = snapshot_stream(spare, "restart-me", chunks[:3])
    spare.stop()
    with pytest.raises(StreamError, match="stream restart-me: connection to the server lost .*(Socket closed|GOAWAY|unavailable)"):
        stream.send(chunks[3])
        stream.receive()
    stream.close()
    spare.start(timeout_s=120)
    with AvatarStream(url(spare), stream_id="restart-me", want_snapshots=True) as resumed:
        result = resumed.run(None, chunks[3:], snapshot=stream.snapshot)
    assert_frames_match(frames + result.frames, want)


@pytest.mark.parametrize("model", ["stream", "vae_decoder"])
def test_killed_python_stub_is_detected_and_the_server_restarts(spare, model, tiny, tiny_runners):
    """Triton 2.51 neither restarts a dead stub nor drops readiness; the launcher's watchdog restarts
    the server, the client gets a clear error, and resumes from its last snapshot."""
    chunks = speech_chunks(5, seed=5)
    want = run_stream(tiny, tiny_runners, 5, chunks, ref_image(tiny, 5))
    stream, frames = snapshot_stream(spare, f"stub-{model}", chunks[:2])
    restarts, old_pgid = spare.restarts, spare.process.pid
    old_regions = {s.shm_region for s in spare.stubs.values()}
    victim = next(s for s in spare.stubs.values() if s.model == model)
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(StreamError, match=f"(Stub process '{model}_0_0' is not healthy|Socket closed|unavailable|GOAWAY)"):
        stream.send(chunks[2])
        stream.receive()
    stream.close()
    deadline = time.monotonic() + 90
    while (spare.restarts == restarts or spare.process is None or not spare.ready()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert spare.restarts == restarts + 1 and spare.ready(), spare.failures
    assert f"python stub of model {model} (pid {victim.pid}) exited" in spare.failures[-1]
    assert not group_alive(old_pgid) and not old_regions & shm_regions()  # nothing left of the old server
    with AvatarStream(url(spare), stream_id=f"stub-{model}", want_snapshots=True) as resumed:
        result = resumed.run(None, chunks[2:], snapshot=stream.snapshot)
    assert_frames_match(frames + result.frames, want)


def test_flowact_serve_exits_non_zero_when_a_stub_dies(spare, tmp_path):
    """The default policy: `flowact serve` stops the server and exits 1, so its supervisor (Kubernetes
    restarts the container) brings it back; the log says which stub died."""
    import psutil

    http, grpc, metrics_port, health = free_ports(4)
    env = dict(os.environ, FLOWACT_DRAIN_FILE=str(tmp_path / "draining"))
    serve = subprocess.Popen([sys.executable, "-m", "flowact.cli", "serve", "--preset", "tiny",
                              "--repository", str(spare.repository), "--work-dir", str(tmp_path / "triton"),
                              "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics_port),
                              "--health-port", str(health)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not serve.stdout.readline().startswith("flowact serving"):
            assert serve.poll() is None, serve.stderr.read()
        stub = next(p for p in psutil.Process(serve.pid).children(recursive=True)
                    if "stream/1/model.py" in " ".join(p.cmdline()))
        stub.kill()
        assert serve.wait(timeout=60) == 1
        assert "python stub of model stream" in serve.stderr.read()
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=60)


# --- security -------------------------------------------------------------------------------------


def test_clients_cannot_load_models_or_reach_admin_endpoints(server):
    grpc = grpcclient.InferenceServerClient(url(server))
    refused = {
        "load": lambda **h: grpc.load_model("flowact", **h),
        "load with code": lambda **h: grpc.load_model("evil", config='{"backend": "python"}',
                                                      files={"file:1/model.py": b"import os"}, **h),
        "unload": lambda **h: grpc.unload_model("flowact", **h),
        "repository index": lambda **h: grpc.get_model_repository_index(**h),
        "model config": lambda **h: grpc.get_model_config("stream", **h),
        "shm status": lambda **h: grpc.get_system_shared_memory_status(**h),
        "shm register": lambda **h: grpc.register_system_shared_memory("r", "/triton_x", 64, **h),
        "cuda shm status": lambda **h: grpc.get_cuda_shared_memory_status(**h),
        "statistics": lambda **h: grpc.get_inference_statistics(**h),
        "log settings": lambda **h: grpc.update_log_settings({"log_verbose_level": 1}, **h),
        "trace settings": lambda **h: grpc.get_trace_settings(**h),
    }
    for what, call in refused.items():
        with pytest.raises(InferenceServerException) as e:
            call()
        assert "restricted" in str(e.value).lower() or "not allowed" in str(e.value).lower(), (what, str(e.value))
    admin = {"headers": {"triton-grpc-protocol-admin-key": server.admin_key}}  # gRPC prefixes the header name
    assert grpc.get_model_repository_index(**admin)  # the operator's key opens the index ...
    for what in ("load", "load with code", "unload"):  # ... but nobody loads or unloads: model control mode none
        with pytest.raises(InferenceServerException, match="(?i)not allowed|polling is enabled|explicit model"):
            refused[what](**admin)
    assert grpc.is_server_ready() and grpc.get_model_metadata("flowact").name == "flowact"  # what clients need
    grpc.close()

    base = server.http_url
    for method, path in (("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/flowact/load"),
                         ("POST", "/v2/repository/models/flowact/unload"), ("GET", "/v2/models/stream/config"),
                         ("GET", "/v2/systemsharedmemory/status"), ("POST", "/v2/systemsharedmemory/region/r/register"),
                         ("GET", "/v2/cudasharedmemory/status"), ("GET", "/v2/models/stats"), ("GET", "/v2/logging"),
                         ("GET", "/v2/trace/setting")):
        request = urllib.request.Request(base + path, method=method, data=b"{}" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=5)
        assert e.value.code in (400, 403), (path, e.value.code)
        assert "restricted" in e.value.read().decode().lower(), path
    with urllib.request.urlopen(base + "/v2/models/flowact", timeout=5) as r:  # metadata stays public
        assert r.status == 200


def non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outbound interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_listens_on_loopback_only(server):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    for port in (server.grpc_port, server.http_port, server.metrics_port):
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((address, port)) != 0, f"port {port} answers on {address}"
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


# --- load -----------------------------------------------------------------------------------------


def test_short_soak_at_real_time(server):
    from flowact.benchmarks.load_soak import soak

    wait_idle(server)
    report = soak(url(server), streams=4, duration_s=12, stream_seconds=6, jitter_buffer_s=0.5, window_s=6,
                  image=ref_image(TINY), server_pgid=server.process.pid, say=lambda msg: None)
    print("\n" + report.table())
    assert report.errors == [] and report.chunks >= 4 * 20
    assert report.verdict(stall_slack=1, rss_growth_mib=RSS_GROWTH_BOUND_MIB) == []
    wait_idle(server)
    assert_accounted(server)
