"""The stream model's state: sessions by correlation id, admission, drain and idle eviction.

No Triton import: the Triton `stream` model (stream/1/model.py) only converts tensors and calls
this. Thread-safe: the idle reaper runs beside execute().
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable

from flowact.engine import InputError, StreamSession
from flowact.serving.server import DEFAULT_DRAIN_FILE


class AdmissionError(InputError):
    """A START the server refuses now (capacity, draining); the client may retry elsewhere."""


@dataclass
class Stream:
    session: StreamSession
    started_at: float  # monotonic seconds
    last_seen: float
    first_chunk_done: bool = False


@dataclass
class Counters:
    """Monotonic counts the metrics export (the registry never resets them)."""

    chunks: int = 0
    rejected: int = 0
    evicted: int = 0
    chunk_seconds: float = 0.0
    ttff_seconds: float = 0.0
    ttff_count: int = 0


@dataclass
class StreamRegistry:
    capacity: int
    idle_ttl_s: float
    new_session: Callable[[], StreamSession]
    drain_file: Path = Path(DEFAULT_DRAIN_FILE)
    clock: Callable[[], float] = time.monotonic
    streams: dict[Hashable, Stream] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def draining(self) -> bool:
        return self.drain_file.exists()

    def active(self) -> int:
        return len(self.streams)

    def start(self, stream_id: Hashable, ref_image, seed: int, prompt: str) -> StreamSession:
        """Admit a new stream (replacing nothing) and start its session, or raise a clear error."""
        with self.lock:
            if stream_id in self.streams:
                raise InputError(f"stream {stream_id!r} is already active: END it before starting it again")
            if self.draining():
                self.counters.rejected += 1
                raise AdmissionError(f"server is draining: no new streams (active {self.active()}); retry on another replica")
            if self.active() >= self.capacity:
                self.counters.rejected += 1
                raise AdmissionError(f"at capacity ({self.active()}/{self.capacity} streams): retry later or on another replica")
            session = self.new_session()
            session.start(ref_image, seed=seed, prompt=prompt)  # raises InputError on a bad image/seed/prompt
            now = self.clock()
            self.streams[stream_id] = Stream(session, now, now)
            return session

    def get(self, stream_id: Hashable) -> Stream:
        with self.lock:
            stream = self.streams.get(stream_id)
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
            self.streams.pop(stream_id, None)

    def evict_idle(self) -> list[Hashable]:
        """Free streams idle longer than the TTL (Triton never tells a model about its idle timeout)."""
        with self.lock:
            now = self.clock()
            gone = [sid for sid, s in self.streams.items() if now - s.last_seen > self.idle_ttl_s]
            for sid in gone:
                del self.streams[sid]
            self.counters.evicted += len(gone)
            return gone
