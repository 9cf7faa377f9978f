"""The stream model's boundary and bookkeeping: request validation into typed requests, streams by
correlation id, admission, drain and idle eviction.

No Triton import: the Triton `stream` model (stream/1/model.py) only converts tensors to numpy
arrays by input name and calls this. Thread-safe: the idle reaper runs beside execute().

The request contract (each refusal an InputError naming the input and the rule):
    AUDIO          float32 (7680,): 0.48 s at 16 kHz, finite, |x| <= 1e3        every request but a hang-up
    REF_IMAGE      uint8 (H, W, 3) of the preset                                START (unless RESUME)
    SEED           int64, 0 <= seed <= 2**63 - 1                                START only, optional
    RESUME         uint8 bytes: a SNAPSHOT this deployment signed, to continue  START only, optional
    PROMPT         UTF-8 text, <= 1024 bytes, no control characters             optional, any request
    BEHAVIOUR      one of speaking | listening | thinking | idle                optional, any request
    WANT_SNAPSHOT  bool: answer with SNAPSHOT (the state after this chunk)      optional, any request
A hang-up (END without AUDIO or START, other inputs ignored: contract.HUNG_UP) ends the stream and
generates nothing. Every input holds exactly one chunk (batch dim 1). PROMPT is a free-text action (an external
planner's); BEHAVIOUR is the closed set of states. A request sends one of them or neither (the
stream keeps the prompt it started with, "speaking" by default); both at once is refused.
Triton itself refuses dtypes and dims that contradict config.pbtxt, and unknown inputs.
"""

from __future__ import annotations

import collections
import math
import threading
import time
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Mapping

import numpy as np

from flowact.contract import (ALREADY_ACTIVE, AUDIO, BEHAVIOUR, BEHAVIOURS, CHUNK_SECONDS_COUNT, CHUNK_SECONDS_SUM,
                              CHUNKS_TOTAL, DEFAULT_PROMPT, DRAIN_EVACUATE, DRAIN_STOPPING, GONE_MEMORY,
                              MAX_TEXT_WIRE_BYTES, MIN_RANDOM_ID_BITS, MIN_RANDOM_ID_CHARS, PROMPT, REF_IMAGE,
                              REQUESTS_INVALID, RESUME, SEED, START_ONLY_INPUTS, STREAM_ID_BYTES, STREAMS_ENDED,
                              STREAMS_EVICTED, STREAMS_REJECTED, STREAMS_RESUMED, STREAMS_STARTED, TTFF_SECONDS_COUNT,
                              TTFF_SECONDS_SUM, WANT_SNAPSHOT)
from flowact.presets import Preset
from flowact.snapshot import peek_preset, unpadded
from flowact.validate import InputError, check_audio_chunk, check_image, check_prompt, check_seed

if TYPE_CHECKING:
    from flowact.state import StreamState


class AdmissionError(InputError):
    """A START the server refuses now (capacity, draining); the client may retry elsewhere."""


STOPPING = "server is stopping"  # how every refusal caused by `flowact serve` stopping begins


def id_entropy_bits(stream_id: str) -> float:
    """An upper estimate of a string's randomness: its length x the Shannon entropy of its own character
    frequencies. A repeated or padded id scores low ("0" * 32: 0 bits, "stream-1" padded with zeros to 32:
    50); 200,000 ids of 16 random bytes as hex scored 82 to 140 bits. Orderly strings of many distinct
    characters ("abcd...") still pass: it refuses what is surely guessable, it cannot prove randomness."""
    counts = collections.Counter(stream_id)
    n = len(stream_id)
    return n * sum(c / n * math.log2(n / c) for c in counts.values())


def check_stream_id(stream_id: Hashable, require_random: bool) -> None:
    """With random ids required, a START's id must be a string of at least MIN_RANDOM_ID_CHARS characters
    whose id_entropy_bits reach MIN_RANDOM_ID_BITS."""
    if not require_random:
        return
    if isinstance(stream_id, str) and len(stream_id) >= MIN_RANDOM_ID_CHARS:
        bits = id_entropy_bits(stream_id)
        if bits >= MIN_RANDOM_ID_BITS:
            return
        got = f"a {len(stream_id)}-character string of about {bits:.0f} bits (under {MIN_RANDOM_ID_BITS}: repeated or padded)"
    else:
        got = f"a {len(stream_id)}-character string" if isinstance(stream_id, str) else "an integer"
    raise InputError(f"stream id: this server requires unguessable stream ids, a string of at least "
                     f"{MIN_RANDOM_ID_CHARS} characters (e.g. {STREAM_ID_BYTES} random bytes as hex); got {got}")


@dataclass(frozen=True)
class StartRequest:
    """START with a reference image: a fresh stream."""

    image: np.ndarray  # (H, W, 3) uint8 of the preset
    seed: int
    prompt: str  # the stream's conditioning text (PROMPT or BEHAVIOUR, else DEFAULT_PROMPT)


@dataclass(frozen=True)
class ResumeRequest:
    """START with RESUME: continue a stream from a snapshot (checked and signed when restored)."""

    snapshot: bytes


@dataclass(frozen=True)
class ChunkRequest:
    """One request of the stream model, checked: the engine trusts it."""

    audio: np.ndarray  # (7680,) float32
    prompt: str | None  # this chunk's conditioning text (PROMPT or BEHAVIOUR); None: the stream's own
    want_snapshot: bool
    end: bool
    begin: StartRequest | ResumeRequest | None = None  # START only: how the stream begins


def single(array: np.ndarray, name: str) -> np.ndarray:
    """The one chunk of a request: strip the batch dim (Triton's inputs are (batch, ...))."""
    if not isinstance(array, np.ndarray) or array.ndim == 0:
        raise InputError(f"{name}: expected a (1, ...) tensor, got {getattr(array, 'shape', type(array).__name__)}")
    if array.shape[0] != 1:
        raise InputError(f"{name}: one chunk per request, got a batch of {array.shape[0]}")
    return array[0]


def scalar(array: np.ndarray, name: str):
    value = single(array, name).reshape(-1)
    if value.size != 1:
        raise InputError(f"{name}: expected one value, got {value.size}")
    return value[0]


def text(array: np.ndarray, name: str) -> str:
    value = scalar(array, name)
    if not isinstance(value, (bytes, str)):
        raise InputError(f"{name}: expected a string (BYTES), got {type(value).__name__}")
    if isinstance(value, bytes):
        if len(value) > MAX_TEXT_WIRE_BYTES:
            raise InputError(f"{name}: {len(value)} bytes is far too long")
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{name}: not valid UTF-8") from None
    value = check_prompt(value, name)
    bad = next((c for c in value if unicodedata.category(c) == "Cc" and c not in "\t\n"), None)
    if bad is not None:
        raise InputError(f"{name}: control character U+{ord(bad):04X} is not allowed")
    return value


def parse_request(inputs: Mapping[str, np.ndarray | None], start: bool, end: bool, preset: Preset,
                  max_snapshot_bytes: int) -> ChunkRequest | None:
    """Triton inputs by name (None: not sent) -> a ChunkRequest, None for a hang-up, or an InputError naming
    the input."""
    get = inputs.get
    if get(AUDIO) is None and end and not start:
        return None
    if get(AUDIO) is None:
        raise InputError(f"{AUDIO}: required in every request (0.48 s of 16 kHz float32 audio)")
    audio = check_audio_chunk(single(get(AUDIO), AUDIO), AUDIO)
    prompt = None if get(PROMPT) is None else text(get(PROMPT), PROMPT)
    behaviour = None if get(BEHAVIOUR) is None else text(get(BEHAVIOUR), BEHAVIOUR)
    if behaviour is not None and behaviour not in BEHAVIOURS:
        raise InputError(f"{BEHAVIOUR}: unknown behaviour {behaviour[:40]!r}: must be one of {', '.join(BEHAVIOURS)} "
                         f"(send free text as {PROMPT})")
    if behaviour is not None and prompt is not None:
        raise InputError(f"{BEHAVIOUR} and {PROMPT}: send one (a behaviour state or a free-text action), not both")
    want = False
    if get(WANT_SNAPSHOT) is not None:
        flag = scalar(get(WANT_SNAPSHOT), WANT_SNAPSHOT)
        if not isinstance(flag, (bool, np.bool_)):
            raise InputError(f"{WANT_SNAPSHOT}: expected a bool, got {type(flag).__name__}")
        want = bool(flag)
    chosen = prompt or behaviour
    if not start:
        for name in START_ONLY_INPUTS:
            if get(name) is not None:
                raise InputError(f"{name}: only allowed with START (the first request of a stream)")
        return ChunkRequest(audio, chosen, want, end)
    return ChunkRequest(audio, chosen, want, end, begin_request(get, chosen, preset, max_snapshot_bytes))


def begin_request(get, prompt: str | None, preset: Preset, max_snapshot_bytes: int) -> StartRequest | ResumeRequest:
    """How a START begins its stream: RESUME (a snapshot) or REF_IMAGE with an optional SEED."""
    if get(RESUME) is not None:
        raw = single(get(RESUME), RESUME)
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise InputError(f"{RESUME}: expected uint8 bytes (1, n), got {raw.dtype} {tuple(get(RESUME).shape)}")
        made_for = peek_preset(raw[:max_snapshot_bytes].tobytes())  # before the size: name the preset
        if made_for is not None and made_for != preset.name:
            raise InputError(f"{RESUME}: a snapshot of preset {made_for!r} cannot resume on this server "
                             f"(preset {preset.name!r})")
        if not 0 < raw.size <= max_snapshot_bytes:
            raise InputError(f"{RESUME}: {raw.size} bytes is outside (0, {max_snapshot_bytes}]")
        return ResumeRequest(unpadded(raw.tobytes(), max_snapshot_bytes))
    if get(REF_IMAGE) is None:
        raise InputError(f"{REF_IMAGE}: required with START (the stream's reference image), "
                         f"unless resuming from {RESUME}")
    image = check_image(single(get(REF_IMAGE), REF_IMAGE), preset, REF_IMAGE)
    seed = 0 if get(SEED) is None else check_seed(scalar(get(SEED), SEED), SEED)
    return StartRequest(image, seed, prompt or DEFAULT_PROMPT)


@dataclass
class Stream:
    state: StreamState
    started_at: float  # monotonic seconds
    last_seen: float
    first_chunk_done: bool = False


def counter(*metrics: str, zero: int | float = 0):
    """A Counters field and the contract.METRICS counters that export it."""
    return field(default=zero, metadata={"metrics": metrics})


@dataclass
class Counters:
    """Monotonic counts the metrics export (the registry never resets them)."""

    chunks: int = counter(CHUNKS_TOTAL, CHUNK_SECONDS_COUNT)
    started: int = counter(STREAMS_STARTED)  # streams admitted (fresh or resumed)
    resumed: int = counter(STREAMS_RESUMED)  # of which from a snapshot
    ended: int = counter(STREAMS_ENDED)  # freed by END or by a failed chunk
    rejected: int = counter(STREAMS_REJECTED)
    evicted: int = counter(STREAMS_EVICTED)
    invalid: int = counter(REQUESTS_INVALID)  # requests refused for their content (InputError other than admission)
    chunk_seconds: float = counter(CHUNK_SECONDS_SUM, zero=0.0)
    ttff_seconds: float = counter(TTFF_SECONDS_SUM, zero=0.0)
    ttff_count: int = counter(TTFF_SECONDS_COUNT)

    def metric_values(self) -> dict[str, int | float]:
        """Metric name -> its value now, for every counter in contract.METRICS."""
        return {name: getattr(self, f.name) for f in fields(self) for name in f.metadata["metrics"]}


@dataclass
class StreamRegistry:
    capacity: int
    idle_ttl_s: float
    release: Callable[[StreamState], None] = lambda state: None  # a stream left: free its state slot (StreamEngine.end)
    drain_file: Path | None = None  # None: never draining (a server started without flowact.serving.drain)
    clock: Callable[[], float] = time.monotonic
    require_random_ids: bool = False  # START refuses integer and short string ids (check_stream_id)
    streams: dict[Hashable, Stream] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Ids freed by the server (idle TTL, stop), newest last -> why: their next request names the cause.
    gone: collections.OrderedDict = field(default_factory=collections.OrderedDict)

    def drain_state(self) -> str | None:
        """None: admitting. Else the drain file's content: "" (`flowact drain`), DRAIN_STOPPING or
        DRAIN_EVACUATE (`flowact serve` is stopping)."""
        if self.drain_file is None:
            return None
        try:
            return self.drain_file.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError:
            return ""

    def draining(self) -> bool:
        return self.drain_state() is not None

    def stopping(self) -> bool:
        return self.drain_state() in (DRAIN_STOPPING, DRAIN_EVACUATE)

    def remember_gone(self, stream_id: Hashable, why: str) -> None:
        self.gone[stream_id] = why
        self.gone.move_to_end(stream_id)
        while len(self.gone) > GONE_MEMORY:
            self.gone.popitem(last=False)

    def active(self) -> int:
        return len(self.streams)

    def admit(self, stream_id: Hashable, begin: Callable[[], StreamState], resumed: bool = False) -> StreamState:
        """Admission (id, duplicate, drain, capacity), then `begin()` (StreamEngine.start or a snapshot's
        restore); nothing is kept if either refuses."""
        with self.lock:
            check_stream_id(stream_id, self.require_random_ids)
            if stream_id in self.streams:
                raise InputError(f"stream {stream_id!r} {ALREADY_ACTIVE}: END it before starting it again")
            state = self.drain_state()
            if state is not None:
                self.counters.rejected += 1
                if state in (DRAIN_STOPPING, DRAIN_EVACUATE):
                    raise AdmissionError(f"{STOPPING}: no new streams; retry on another replica")
                raise AdmissionError(f"server is draining: no new streams (active {self.active()}); retry on another replica")
            if self.active() >= self.capacity:
                self.counters.rejected += 1
                raise AdmissionError(f"at capacity ({self.active()}/{self.capacity} streams): retry later or on another replica")
            stream_state = begin()  # raises InputError on a bad snapshot, holding nothing
            now = self.clock()
            self.streams[stream_id] = Stream(stream_state, now, now)
            self.gone.pop(stream_id, None)
            self.counters.started += 1
            self.counters.resumed += resumed
            return stream_state

    def get(self, stream_id: Hashable) -> Stream:
        """The stream of a request after START; refuses an unknown id naming why it is gone, and ends
        every stream once the server evacuates (the drain timeout of a stop passed)."""
        with self.lock:
            stream = self.streams.get(stream_id)
            if stream is None and stream_id in self.gone:
                raise InputError(f"stream {stream_id!r} {self.gone[stream_id]}")
            if stream is not None and self.drain_state() == DRAIN_EVACUATE:
                self.end(stream_id)
                resume = f"continue it on another replica (START with {RESUME} = your last SNAPSHOT)"
                self.remember_gone(stream_id, f"was ended: {STOPPING} and the drain timeout passed; {resume}")
                raise AdmissionError(f"{STOPPING}: stream {stream_id!r} ended here (the drain timeout passed); {resume}")
            if stream is None:
                raise InputError(f"unknown stream {stream_id!r}: it ended, was evicted after {self.idle_ttl_s:g} s idle, "
                                 "or never started (send the reference image with START)")
            stream.last_seen = self.clock()
            return stream

    def chunk_done(self, stream_id: Hashable, seconds: float) -> None:
        with self.lock:
            self.counters.chunks += 1
            self.counters.chunk_seconds += seconds
            stream = self.streams.get(stream_id)
            if stream is not None and not stream.first_chunk_done:
                stream.first_chunk_done = True
                self.counters.ttff_seconds += self.clock() - stream.started_at
                self.counters.ttff_count += 1

    def end(self, stream_id: Hashable) -> None:
        with self.lock:
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self.release(stream.state)
                self.counters.ended += 1

    def refused(self, error: Exception) -> None:
        """Count a request refused for its content (admission refusals count themselves)."""
        if isinstance(error, InputError) and not isinstance(error, AdmissionError):
            with self.lock:
                self.counters.invalid += 1

    def evict_idle(self) -> list[Hashable]:
        """Free streams idle longer than the TTL (Triton never tells a model about its idle timeout)."""
        with self.lock:
            now = self.clock()
            gone = [sid for sid, s in self.streams.items() if now - s.last_seen > self.idle_ttl_s]
            for sid in gone:
                stream = self.streams.pop(sid)
                self.release(stream.state)
                self.remember_gone(sid, f"was evicted after {now - stream.last_seen:.1f} s idle (idle TTL "
                                        f"{self.idle_ttl_s:g} s): START it again ({RESUME} with its last SNAPSHOT continues it)")
            self.counters.evicted += len(gone)
            return gone
