"""gRPC streaming client: one ModelStreamInfer per avatar stream.

The reference image (and seed, prompt) go with the START request; every request carries 0.48 s
of audio; every response carries 12 frames. Requests are paced at real time (`realtime=True`,
chunk i is sent 0.48 s * i after the first) or sent as fast as the server answers with at most
`max_in_flight` chunks outstanding. One gRPC stream per avatar stream keeps all its chunks on one
server behind any HTTP/2-aware load balancer.

Stream ids are capabilities: whoever holds one can feed, read and END that stream. By default a
stream gets 128 random bits (a 32-character hex string). After sending START the sender waits for
its answer before sending anything else into the id: if the START is refused (at capacity, or the
id is already active), nothing of this client reaches a stream it does not own.

Resumable streams: with `want_snapshots=True` every response also carries the stream's signed
state (`AvatarStream.snapshot`, opaque bytes). If the server goes away, a new AvatarStream on any
server of the same deployment continues the stream with `run(None, remaining_chunks,
snapshot=that_snapshot)`: the frames are those an uninterrupted run would have produced.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from flowact.contract import (AUDIO, BEHAVIOUR, ENSEMBLE_MODEL, FRAMES, PROMPT, REF_IMAGE, RESUME, SEED, SNAPSHOT,
                              STREAM_ID_BYTES, WANT_SNAPSHOT, WIRE_DTYPES)
from flowact.presets import CHUNK_SECONDS
from flowact.stats import StreamSummary

MODEL = ENSEMBLE_MODEL


def new_stream_id() -> str:
    """An unguessable stream id: 128 random bits as 32 hex characters."""
    return secrets.token_hex(STREAM_ID_BYTES)


class StreamError(RuntimeError):
    """The server refused or failed a chunk of this stream, or could not be reached; the message says which."""


@dataclass
class StreamResult:
    frames: list[np.ndarray] = field(default_factory=list)  # one (12, H, W, 3) uint8 per chunk
    snapshot: bytes | None = None  # the stream's state after the last chunk (want_snapshots=True)
    send_times: list[float] = field(default_factory=list)  # monotonic seconds
    arrival_times: list[float] = field(default_factory=list)

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


class AvatarStream:
    """One avatar stream over one gRPC bidirectional stream."""

    def __init__(self, url: str, stream_id: int | str | None = None, model: str = MODEL, timeout_s: float = 60.0,
                 want_snapshots: bool = False):
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self.stream_id = stream_id if stream_id is not None else new_stream_id()
        self.want_snapshots = want_snapshots
        self.snapshot: bytes | None = None  # the latest snapshot received
        self.outputs = [FRAMES, SNAPSHOT] if want_snapshots else [FRAMES]
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.last_error: str | None = None  # the latest error the stream callback saw
        self.last_resume: bytes | None = None  # the snapshot the latest START resumed from
        self.client.start_stream(callback=self._on_response)

    def _on_response(self, result, error):  # tritonclient needs these parameter names
        if error is not None:
            self.last_error = error.message() if hasattr(error, "message") else str(error)
        self.responses.put((time.monotonic(), result, error))

    def send(self, audio: np.ndarray, start: bool = False, end: bool = False, image=None, seed=None, prompt=None,
             behaviour=None, snapshot: bytes | None = None):
        inputs = make_inputs(audio, image, seed, prompt, behaviour, snapshot, self.want_snapshots)
        if start:
            self.last_resume = snapshot
        try:
            self.client.async_stream_infer(self.model, inputs, sequence_id=self.stream_id, sequence_start=start,
                                           sequence_end=end,
                                           outputs=[grpcclient.InferRequestedOutput(name) for name in self.outputs])
        except InferenceServerException as e:  # the gRPC stream broke (server gone); the cause came to the callback
            cause = self.last_error or e.message()
            raise StreamError(f"stream {self.stream_id}: connection to the server lost ({cause}); open a new "
                              "AvatarStream (with RESUME to continue from the last snapshot)") from None

    def receive(self) -> tuple[float, np.ndarray]:
        try:
            arrival, result, error = self.responses.get(timeout=self.timeout_s)
        except queue.Empty:
            raise StreamError(f"stream {self.stream_id}: no response within {self.timeout_s:.0f} s") from None
        if error is not None:
            message = error.message() if hasattr(error, "message") else str(error)
            if getattr(error, "status", lambda: None)() is not None:  # a gRPC status: the stream itself broke
                raise StreamError(f"stream {self.stream_id}: connection to the server lost ({error.status()}: {message}); "
                                  "open a new AvatarStream (with RESUME to continue from the last snapshot)")
            if self.last_resume is not None and f"input '{RESUME}'" in message:  # Triton refused its size
                message = resume_refusal(self.last_resume, message)
            raise StreamError(f"stream {self.stream_id}: {message}")  # the server's answer to this request
        if self.want_snapshots:
            self.snapshot = result.as_numpy(SNAPSHOT)[0].tobytes()
        return arrival, result.as_numpy(FRAMES)[0]

    def run(self, image: np.ndarray | None, chunks: Iterable[np.ndarray], seed: int = 0, prompt: str | None = None,
            realtime: bool = False, max_in_flight: int = 2,
            on_chunk: Callable[[np.ndarray], None] | None = None, end: bool = True,
            snapshot: bytes | None = None, behaviour: str | None = None) -> StreamResult:
        """Send every chunk (START with the first, END with the last) and collect the frames in order.

        With `snapshot` the stream resumes from it (image and seed are then not needed). The second
        chunk leaves only once the START is answered: a refused START ends the run with nothing more
        sent into an id that may belong to another stream."""
        chunks = list(chunks)
        result = StreamResult()
        in_flight = threading.Semaphore(max_in_flight)
        stop = threading.Event()
        started = threading.Event()  # the START's answer arrived (or the run ended)
        t0 = time.monotonic()
        errors: list[BaseException] = []

        def sender():
            try:
                for i, audio in enumerate(chunks):
                    if realtime:
                        time.sleep(max(0.0, t0 + i * CHUNK_SECONDS - time.monotonic()))
                    if i == 1 and (not started.wait(self.timeout_s) or stop.is_set()):
                        return  # the START was refused (or never answered): the id is not ours
                    if not in_flight.acquire(timeout=self.timeout_s) or stop.is_set():
                        return
                    result.send_times.append(time.monotonic())
                    first = i == 0
                    resume = first and snapshot is not None
                    self.send(audio, start=first, end=end and i == len(chunks) - 1,
                              image=image if first and not resume else None,
                              seed=seed if first and not resume else None,
                              prompt=prompt if first else None, behaviour=behaviour if first else None,
                              snapshot=snapshot if resume else None)
            except BaseException as e:  # surfaced by the receiving loop
                errors.append(e)

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        try:
            for _ in chunks:
                arrival, frames = self.receive()
                started.set()
                in_flight.release()
                result.arrival_times.append(arrival)
                result.frames.append(frames)
                result.snapshot = self.snapshot
                if on_chunk is not None:
                    on_chunk(frames)
        finally:
            stop.set()
            started.set()  # wake a sender waiting for the START's answer (it sees stop)
            in_flight.release()  # wake a sender waiting for a slot
            thread.join(timeout=self.timeout_s)
        if errors:
            raise StreamError(f"stream {self.stream_id}: sending failed: {errors[0]}")
        return result

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()

    def __enter__(self) -> "AvatarStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
