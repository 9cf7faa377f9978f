"""gRPC streaming client: one ModelStreamInfer per avatar stream.

The reference image (and seed, prompt) go with the START request; every request carries 0.48 s
of audio; every response carries 12 frames. Requests are paced at real time (`realtime=True`,
chunk i is sent 0.48 s * i after the first) or sent as fast as the server answers with at most
`max_in_flight` chunks outstanding. One gRPC stream per avatar stream keeps all its chunks on one
server behind any HTTP/2-aware load balancer.

Stream ids are capabilities: whoever holds one can feed, read and END that stream. By default a
stream gets 128 random bits (a 32-character hex string). After sending START the sender waits for
its answer before sending anything else into the id: if the START is refused (at capacity, or the
id is already active), nothing of this client reaches a stream it does not own. Closing a stream that
is still open (a START refused for any cause but "already active", or a run that stopped before its
END was answered) hangs it up (END without audio, contract.HUNG_UP): the server frees its slot at once,
not at its idle timeout, and a stopping server does not wait for it.

Resumable streams: with `want_snapshots=True` every response also carries the stream's signed
state (`AvatarStream.snapshot`, opaque bytes). If the server goes away, a new AvatarStream on any
server of the same deployment continues the stream with `run(None, remaining_chunks,
snapshot=that_snapshot)`: the frames are those an uninterrupted run would have produced.

Failover: with `failover=FailoverPolicy()` (what `flowact stream` and the load generator use) `run`
does that by itself. It asks for a snapshot on chunks 0, K, 2K, ... (`snapshot_every`) and keeps
the audio of every chunk since the latest one. When the replica goes away (the gRPC stream breaks,
or the server answers "server is stopping", "server is draining", "at capacity", that its python
stub is not healthy, or that the model has no available versions (unloading at the end of a stop):
`flowact.contract.FAILOVER_REFUSALS`) it hangs up the old id where the replica still answers, opens a
new gRPC stream to the same address (a gateway in front of the replicas), STARTs under a fresh random
stream id with RESUME = the latest snapshot, or before the
first snapshot a fresh START with the same image and seed (same seed, same noise), and re-sends
every chunk from there. Chunks the replay regenerates that were already delivered are dropped (the
responses of one gRPC stream come in order, so the n-th answer is chunk start + n): the caller gets
every chunk exactly once, with the frames of an uninterrupted stream. Retries wait with exponential
backoff and full jitter, bounded in attempts and seconds per failover; then a StreamError names the
cause. Each failover is reported in `StreamResult.failovers`. A server without a snapshot key refuses
the START that asks for one: the stream (and this process's later streams to that address) then
runs without snapshots and fails over by replaying from chunk 0. Without `failover` a failure raises StreamError at once (as before).
"""

from __future__ import annotations

import functools
import itertools
import queue
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from flowact.contract import (ALREADY_ACTIVE, AUDIO, BEHAVIOUR, ENSEMBLE_MODEL, FAILOVER_CONNECTION_LOST,
                              FAILOVER_REFUSALS, FAILOVER_SNAPSHOT_EVERY, FRAMES, HANG_UP_WAIT_S, PROMPT, REF_IMAGE,
                              RESUME, SEED, SNAPSHOT, SNAPSHOTS_DISABLED, STREAM_ID_BYTES, WANT_SNAPSHOT, WIRE_DTYPES)
from flowact.presets import CHUNK_SECONDS
from flowact.stats import StreamSummary

MODEL = ENSEMBLE_MODEL


def new_stream_id() -> str:
    """An unguessable stream id: 128 random bits as 32 hex characters."""
    return secrets.token_hex(STREAM_ID_BYTES)


class StreamError(RuntimeError):
    """The server refused or failed a chunk of this stream, or could not be reached; the message says which."""


class NoResponse(StreamError):
    """No answer came within the stream's timeout."""


class ReplicaGone(StreamError):
    """The stream's replica went away or would not take it (`cause`: a FAILOVER_REFUSALS value or
    FAILOVER_CONNECTION_LOST); with failover on, the stream continues elsewhere."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


@dataclass(frozen=True)
class FailoverPolicy:
    """How a stream continues after its replica went away."""

    snapshot_every: int = FAILOVER_SNAPSHOT_EVERY  # ask for a snapshot on chunks 0, K, 2K, ... (0: never; replay from 0)
    max_attempts: int = 20  # STARTs tried per failover before StreamError: ~16 s of backoff on average
    max_seconds: float = 30.0  # ... or seconds since the failure, whichever comes first
    backoff_s: float = 0.05  # retry n waits uniform(0, min(max_backoff_s, backoff_s * 2**n)) s: full jitter
    max_backoff_s: float = 2.0

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry `retry` (0, 1, ...): exponential backoff with full jitter."""
        return random.uniform(0.0, min(self.max_backoff_s, self.backoff_s * 2 ** retry))


@dataclass
class Failover:
    """One failover of a stream, as the viewer saw it."""

    cause: str  # FAILOVER_CONNECTION_LOST or a FAILOVER_REFUSALS value
    message: str  # what gRPC or the server said
    at_chunk: int  # the first chunk not delivered when it happened
    resumed_from: int  # the chunk the new START began with (0: a fresh START, else after its snapshot)
    replayed: int  # chunks sent again (sent before the failure, not covered by the snapshot)
    attempts: int  # STARTs sent after the failure (the last one was admitted)
    gap_s: float  # from the last chunk delivered before the failure to the next new chunk delivered


@dataclass
class StreamResult:
    frames: list[np.ndarray] = field(default_factory=list)  # one (12, H, W, 3) uint8 per chunk
    snapshot: bytes | None = None  # the stream's latest snapshot (want_snapshots=True, or failover)
    send_times: list[float] = field(default_factory=list)  # monotonic seconds chunk i was first sent
    arrival_times: list[float] = field(default_factory=list)  # ... and delivered
    failovers: list[Failover] = field(default_factory=list)

    def summary(self, jitter_buffer: float = 0.0) -> StreamSummary:
        latencies = [a - s for s, a in zip(self.send_times, self.arrival_times)]
        t0 = self.send_times[0]
        arrivals = [a - t0 for a in self.arrival_times]
        return StreamSummary.from_timings(arrivals[0], latencies, arrivals, arrivals[-1], jitter_buffer)


def make_inputs(audio: np.ndarray, image: np.ndarray | None = None, seed: int | None = None,
                prompt: str | None = None, behaviour: str | None = None, snapshot: bytes | None = None,
                want_snapshot: bool = False) -> list[grpcclient.InferInput]:
    tensors: list[tuple[str, np.ndarray]] = [(AUDIO, audio[None])]  # (1, 7680)
    if image is not None:
        tensors.append((REF_IMAGE, image[None]))  # (1, H, W, 3)
    if seed is not None:
        tensors.append((SEED, np.array([[seed]], dtype=np.int64)))  # (1, 1)
    if prompt is not None:
        tensors.append((PROMPT, np.array([[prompt.encode("utf-8")]], dtype=np.object_)))  # (1, 1)
    if behaviour is not None:
        tensors.append((BEHAVIOUR, np.array([[behaviour.encode("utf-8")]], dtype=np.object_)))  # (1, 1)
    if snapshot is not None:
        tensors.append((RESUME, np.frombuffer(snapshot, dtype=np.uint8)[None]))  # (1, n)
    if want_snapshot:
        tensors.append((WANT_SNAPSHOT, np.array([[True]])))  # (1, 1)
    inputs = []
    for name, array in tensors:
        tensor = grpcclient.InferInput(name, list(array.shape), WIRE_DTYPES[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def resume_refusal(snapshot: bytes, message: str) -> str:
    """Triton refused a RESUME's size (the input has one fixed size per preset): name the preset the
    snapshot was made for, which is the usual cause."""
    from flowact.snapshot import peek_preset  # torch: only on this error path

    made_for = peek_preset(snapshot)
    what = f"a snapshot of preset {made_for!r}" if made_for else "not a snapshot"
    return f"{RESUME}: {what} ({len(snapshot)} bytes) does not fit this server's preset: {message}"


# Addresses whose server refused a snapshot (it has no FLOWACT_SNAPSHOT_KEY): this process's later
# streams there ask for none, and fail over by replaying from chunk 0.
NO_SNAPSHOTS: set[str] = set()


def broke(error) -> bool:
    """The gRPC stream itself broke (the error has a gRPC status), not a server's answer to one request."""
    return getattr(error, "status", lambda: None)() is not None


def refusal_cause(message: str) -> str | None:
    """The failover cause a server's refusal names (FAILOVER_REFUSALS, any case), or None: not a replica's failure."""
    message = message.lower()
    return next((cause for text, cause in FAILOVER_REFUSALS.items() if text in message), None)


class ChunkSource:
    """A run's audio, read one chunk ahead from the caller's iterable (the END goes with the last),
    keeping every chunk not yet forgotten (those since the latest snapshot): what a failover re-sends."""

    def __init__(self, chunks: Iterable[np.ndarray]):
        self.source = iter(chunks)
        self.kept: dict[int, np.ndarray] = {}
        self.read = 0  # chunks taken from the source
        self.total: int | None = None  # known once the source is exhausted
        self.lock = threading.Lock()

    def get(self, i: int) -> np.ndarray | None:
        """Chunk i (None: the audio ended before it)."""
        with self.lock:
            while self.read <= i and self.total is None:
                try:
                    self.kept[self.read] = next(self.source)
                    self.read += 1
                except StopIteration:
                    self.total = self.read
            return self.kept.get(i)

    def forget_before(self, i: int) -> None:
        with self.lock:
            for k in [k for k in self.kept if k < i]:
                del self.kept[k]


@dataclass
class Outage:
    """A failover in progress: from the failure until the next new chunk is delivered."""

    cause: str
    message: str
    at_chunk: int
    since: float  # the last delivery before the failure (or the first send)
    started: float  # when the failure was seen
    sent: int  # chunks sent before the failure
    attempts: int = 0
    resumed_from: int = 0


class AvatarStream:
    """One avatar stream over one gRPC bidirectional stream (a new one per failover)."""

    def __init__(self, url: str, stream_id: int | str | None = None, model: str = MODEL, timeout_s: float = 60.0,
                 want_snapshots: bool = False, failover: FailoverPolicy | None = None):
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self.stream_id = stream_id if stream_id is not None else new_stream_id()
        self.want_snapshots = want_snapshots  # a snapshot with every chunk
        self.failover = failover  # None: a failure raises StreamError
        self.snapshot: bytes | None = None  # the latest snapshot received
        self.result: StreamResult | None = None  # the latest run's (after a StreamError: what arrived)
        self.last_error: str | None = None  # the latest error the stream callback saw
        self.last_resume: bytes | None = None  # the snapshot the latest START resumed from
        self.connect()

    def connect(self) -> None:
        """Open a gRPC stream (a new channel: after a failover it may reach another replica)."""
        self.client = grpcclient.InferenceServerClient(self.url)
        self.responses: queue.Queue = queue.Queue()  # this gRPC stream's answers only
        self.last_error = None
        self.open = False  # this id STARTed here, is ours, and its END is not answered: close() hangs it up
        self.sent = self.answered = 0  # requests on this gRPC stream and their answers (in order)
        self.end_request: int | None = None  # which of them carried END
        self.client.start_stream(callback=functools.partial(self._on_response, self.responses))

    def _on_response(self, answers: queue.Queue, result, error):  # tritonclient needs these parameter names
        if error is not None:
            self.last_error = error.message() if hasattr(error, "message") else str(error)
        if answers is self.responses:  # not a late answer of an earlier gRPC stream
            self.answered += 1
            if self.end_request is not None and self.answered > self.end_request:
                self.open = False  # the END is answered: the stream ended (or never began)
            if error is not None and (ALREADY_ACTIVE in self.last_error or broke(error)):
                self.open = False  # the START found the id in use (not ours), or the gRPC stream broke
        answers.put((time.monotonic(), result, error))

    def send(self, audio: np.ndarray, start: bool = False, end: bool = False, image=None, seed=None, prompt=None,
             behaviour=None, snapshot: bytes | None = None, want_snapshot: bool = False):
        inputs = make_inputs(audio, image, seed, prompt, behaviour, snapshot, self.want_snapshots or want_snapshot)
        if start:
            self.last_resume = snapshot
            self.open = True
        if end:
            self.end_request = self.sent
        self.sent += 1
        try:
            self.client.async_stream_infer(self.model, inputs, sequence_id=self.stream_id, sequence_start=start,
                                           sequence_end=end, outputs=[grpcclient.InferRequestedOutput(FRAMES),
                                                                      grpcclient.InferRequestedOutput(SNAPSHOT)])
        except InferenceServerException as e:  # the gRPC stream broke (server gone); the cause came to the callback
            cause = self.last_error or e.message()
            raise ReplicaGone(f"stream {self.stream_id}: connection to the server lost ({cause}); open a new "
                              "AvatarStream (with RESUME to continue from the last snapshot)",
                              FAILOVER_CONNECTION_LOST) from None

    def receive(self, timeout_s: float | None = None) -> tuple[float, np.ndarray]:
        arrival, frames, _ = self._receive(timeout_s)
        return arrival, frames

    def _receive(self, timeout_s: float | None = None) -> tuple[float, np.ndarray, bytes | None]:
        """-> (arrival, frames, the snapshot this answer carried or None)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            arrival, result, error = self.responses.get(timeout=timeout_s)
        except queue.Empty:
            raise NoResponse(f"stream {self.stream_id}: no response within {timeout_s:.0f} s") from None
        if isinstance(error, StreamError):  # from the sender: this gRPC stream could not take a request
            raise error
        if error is not None:
            message = error.message() if hasattr(error, "message") else str(error)
            if broke(error):
                raise ReplicaGone(f"stream {self.stream_id}: connection to the server lost ({error.status()}: "
                                  f"{message}); open a new AvatarStream (with RESUME to continue from the last "
                                  "snapshot)", FAILOVER_CONNECTION_LOST)
            if self.last_resume is not None and f"input '{RESUME}'" in message:  # Triton refused its size
                message = resume_refusal(self.last_resume, message)
            cause = refusal_cause(message)
            if cause is not None:
                raise ReplicaGone(f"stream {self.stream_id}: {message}", cause)
            raise StreamError(f"stream {self.stream_id}: {message}")  # the server's answer to this request
        snapshot = result.as_numpy(SNAPSHOT)
        snapshot = snapshot[0].tobytes() if snapshot is not None and snapshot.size else None
        if snapshot is not None:
            self.snapshot = snapshot
        return arrival, result.as_numpy(FRAMES)[0], snapshot

    def run(self, image: np.ndarray | None, chunks: Iterable[np.ndarray], seed: int = 0, prompt: str | None = None,
            realtime: bool = False, max_in_flight: int = 2,
            on_chunk: Callable[[np.ndarray], None] | None = None, end: bool = True,
            snapshot: bytes | None = None, behaviour: str | None = None,
            start_at: float | None = None, deadline: float | None = None) -> StreamResult:
        """Send every chunk (START with the first, END with the last) and collect the frames in order.

        With `snapshot` the stream resumes from it (image and seed are then not needed). The second
        chunk leaves only once the START is answered: a refused START ends the run with nothing more
        sent into an id that may belong to another stream. `chunks` is read one chunk ahead, so it may
        be a generator. Real time paces chunk i at `start_at` (monotonic; default now) + 0.48 s * i.
        At `deadline` (monotonic) the run stops and returns what arrived. With a failover policy a
        lost replica is replaced (module docstring); `self.result` holds what arrived even when a
        StreamError ends the run."""
        source = ChunkSource(chunks)
        result = self.result = StreamResult()
        t0 = time.monotonic() if start_at is None else start_at
        resume = snapshot  # the latest snapshot and the chunks it covers
        covered = 0
        snapshots = self.failover is not None and self.url not in NO_SNAPSHOTS
        outage: Outage | None = None
        while True:
            try:
                for j, arrival, frames, snap in self._attempt(source, covered, resume, image, seed, prompt, behaviour,
                                                              end, realtime, t0, max_in_flight, snapshots, deadline):
                    if snap is not None and j + 1 > covered:
                        resume, covered = snap, j + 1
                        result.snapshot = snap
                        source.forget_before(covered)
                    if j < len(result.frames):
                        continue  # a replayed chunk the caller already has
                    if outage is not None:
                        result.failovers.append(Failover(outage.cause, outage.message, outage.at_chunk,
                                                         outage.resumed_from, outage.sent - outage.resumed_from,
                                                         outage.attempts, arrival - outage.since))
                        outage = None
                    result.arrival_times.append(arrival)
                    result.frames.append(frames)
                    if on_chunk is not None:
                        on_chunk(frames)
                return result
            except ReplicaGone as e:
                if self.failover is None:
                    raise
                now = time.monotonic()
                if outage is None:
                    since = result.arrival_times[-1] if result.arrival_times else t0
                    outage = Outage(e.cause, str(e), len(result.frames), since, now, len(result.send_times))
                outage.attempts += 1
                outage.resumed_from = covered
                waited = now - outage.started
                if outage.attempts > self.failover.max_attempts or waited >= self.failover.max_seconds:
                    raise StreamError(f"{e} (failover gave up after {outage.attempts - 1} STARTs in {waited:.1f} s; "
                                      f"it began with: {outage.cause}: {outage.message})") from None
                pause = self.failover.delay(outage.attempts - 1)
                if deadline is not None and now + pause >= deadline:
                    return result
                time.sleep(pause)
            except StreamError as e:
                if not (snapshots and SNAPSHOTS_DISABLED in str(e) and covered == 0 and resume is None):
                    raise
                snapshots = False  # this deployment has no snapshot key: fail over by replaying from chunk 0
                NO_SNAPSHOTS.add(self.url)
            self.reconnect()

    def reconnect(self) -> None:
        """Drop this gRPC stream (hanging up the id where it is still open) and open another under a fresh
        id: ids are capabilities."""
        self.close(cancel_requests=True)
        self.stream_id = new_stream_id()
        self.connect()

    def hang_up(self) -> None:
        """END the id without audio (contract.HUNG_UP): the server frees the stream and Triton its sequence
        slot now, not at their idle timeouts. Waits up to HANG_UP_WAIT_S for its answer (chunks in flight
        answer first; the answers before it are dropped); a broken gRPC stream has nothing left to free."""
        self.open = False
        mine = self.sent
        self.sent += 1
        try:
            self.client.async_stream_infer(self.model, [], sequence_id=self.stream_id, sequence_end=True)
        except InferenceServerException:
            return
        deadline = time.monotonic() + HANG_UP_WAIT_S
        while self.answered <= mine and (wait := deadline - time.monotonic()) > 0:
            try:
                _, _, error = self.responses.get(timeout=wait)
            except queue.Empty:
                return
            if error is not None and broke(error):
                return

    def _attempt(self, source: ChunkSource, begin: int, resume: bytes | None, image, seed, prompt, behaviour,
                 end: bool, realtime: bool, t0: float, max_in_flight: int, snapshots: bool, deadline: float | None):
        """One gRPC stream: START at chunk `begin` (RESUME with `resume`, else image and seed), send the
        chunks from there, yield (chunk, arrival, frames, snapshot or None) as they arrive."""
        result = self.result
        in_flight = threading.Semaphore(max_in_flight)
        stop = threading.Event()
        started = threading.Event()  # the START's answer arrived (or the attempt ended)
        answers = self.responses
        every = self.failover.snapshot_every if snapshots else 0

        def sender():
            try:
                for i in itertools.count(begin):
                    audio = source.get(i)
                    if audio is None:
                        return
                    if realtime and stop.wait(max(0.0, t0 + i * CHUNK_SECONDS - time.monotonic())):
                        return
                    if i == begin + 1 and (not started.wait(self.timeout_s) or stop.is_set()):
                        return  # the START was refused (or never answered): the id is not ours
                    if not in_flight.acquire(timeout=self.timeout_s) or stop.is_set():
                        return
                    if i == len(result.send_times):
                        result.send_times.append(time.monotonic())
                    first = i == begin
                    fresh = first and resume is None
                    self.send(audio, start=first, end=end and source.get(i + 1) is None,
                              image=image if fresh else None, seed=seed if fresh else None,
                              prompt=prompt if i == 0 else None, behaviour=behaviour if i == 0 else None,
                              snapshot=resume if first else None, want_snapshot=every > 0 and i % every == 0)
            except BaseException as e:  # surfaced by the receiving loop
                failed = e if isinstance(e, StreamError) else StreamError(f"stream {self.stream_id}: sending failed: {e!r}")
                answers.put((time.monotonic(), None, failed))

        source.get(begin)  # an empty run ends here
        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        try:
            for j in itertools.count(begin):
                if source.total is not None and j >= source.total:
                    return
                wait = self.timeout_s if deadline is None else min(self.timeout_s, deadline - time.monotonic())
                if wait <= 0:
                    return
                try:
                    arrival, frames, snap = self._receive(wait)
                except NoResponse:
                    if deadline is not None and time.monotonic() >= deadline:
                        return  # the caller's deadline: what arrived is the result
                    raise
                started.set()
                in_flight.release()
                yield j, arrival, frames, snap
        finally:
            stop.set()
            started.set()  # wake a sender waiting for the START's answer (it sees stop)
            in_flight.release()  # wake a sender waiting for a slot
            thread.join(timeout=self.timeout_s)

    def close(self, cancel_requests: bool = False) -> None:
        """Close the gRPC stream: after the answers in flight, or at once with `cancel_requests`. A stream
        still open (its START refused, or a run that stopped before END was answered) is hung up first."""
        if self.open:
            self.hang_up()
        self.client.stop_stream(cancel_requests=cancel_requests)
        self.client.close()

    def __enter__(self) -> "AvatarStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
