"""The session's timelines, without WebRTC or gRPC: audio in -> chunks, conditioning per chunk, and the
jitter buffer a new session gets.

Times are time.monotonic() seconds. Sample s of a session's audio timeline is due at
`origin + s / 16000`; chunk k holds samples [7680 k, 7680 (k + 1)) and becomes frames
[12 k, 12 k + 12). The timeline follows the wall clock, not the input: input later than a small
slack is replaced by silence (and dropped when it arrives), so a silent or absent microphone keeps
the avatar alive and a late packet never shifts lips against sound.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from flowact.contract import BEHAVIOURS, MAX_PROMPT_BYTES, WEB_BEHAVIOUR_AUTO, WEB_JITTER_BUFFER_S
from flowact.presets import FPS, SAMPLE_RATE, SAMPLES_PER_CHUNK
from flowact.stats import percentile

INPUT_SLACK_S = 0.12  # input audio later than this is replaced by silence (the avatar never waits)
SILENCE_RMS = 0.003  # a chunk whose RMS is below this (about -50 dBFS) is silent
IDLE_AFTER_CHUNKS = 2  # silent chunks (0.96 s) before auto switches to idle
# A measured jitter buffer is clamped to [MIN, MAX]: a window measured at lighter load under-predicts
# (4 sessions after 1-2: 1.8 % late at 80 ms).
MIN_JITTER_BUFFER_S = 0.12
MAX_JITTER_BUFFER_S = 1.0


@dataclass(frozen=True)
class Chunk:
    index: int
    audio: np.ndarray  # (7680,) float32, 16 kHz mono
    complete_at: float  # when its last sample was there (monotonic s)
    filled: int  # samples of silence standing in for late or absent input

    @property
    def rms(self) -> float:
        return float(np.sqrt(np.mean(np.square(self.audio, dtype=np.float64))))


class ChunkAssembler:
    """16 kHz mono samples in, 0.48 s chunks out, on a timeline that never waits for input.

    `push` appends what the viewer sent; `fill` (called often) appends silence for input more than
    `slack_s` late and remembers it as debt: that much late input is dropped when it comes."""

    def __init__(self, slack_s: float = INPUT_SLACK_S):
        self.slack_s = slack_s
        self.origin: float | None = None  # when sample 0 was due
        self.written = 0  # samples on the timeline (input and silence)
        self.debt = 0  # silence samples not yet paid back by late input
        self.filled_total = 0
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._pending_filled = 0
        self._index = 0

    def start(self, origin: float) -> None:
        """Fix sample 0's time (the first input frame's start, or the connection if no audio comes)."""
        if self.origin is None:
            self.origin = origin

    def push(self, samples: np.ndarray, now: float) -> list[Chunk]:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.start(now - len(samples) / SAMPLE_RATE)
        paid = min(self.debt, len(samples))
        self.debt -= paid
        return self._append(samples[paid:], now, silent=False)

    def fill(self, now: float) -> list[Chunk]:
        if self.origin is None:
            return []
        missing = int((now - self.slack_s - self.origin) * SAMPLE_RATE) - self.written
        if missing <= 0:
            return []
        self.debt += missing
        self.filled_total += missing
        return self._append(np.zeros(missing, dtype=np.float32), now, silent=True)

    def _append(self, samples: np.ndarray, now: float, silent: bool) -> list[Chunk]:
        chunks = []
        while len(samples):
            take = min(len(samples), SAMPLES_PER_CHUNK - self._pending_len)
            self._pending.append(samples[:take])
            self._pending_len += take
            self._pending_filled += take if silent else 0
            self.written += take
            samples = samples[take:]
            if self._pending_len == SAMPLES_PER_CHUNK:
                chunks.append(Chunk(self._index, np.concatenate(self._pending), now, self._pending_filled))
                self._index += 1
                self._pending, self._pending_len, self._pending_filled = [], 0, 0
        return chunks


class ControlError(ValueError):
    """A data-channel message the edge cannot apply; the message says why."""


class Conditioning:
    """What each chunk is conditioned on: a fixed behaviour, a free-text prompt, or `auto` (speaking
    while the voice is active, idle after IDLE_AFTER_CHUNKS silent chunks: silence keeps the
    avatar alive instead of freezing it mid-word)."""

    def __init__(self, behaviour: str = WEB_BEHAVIOUR_AUTO, prompt: str | None = None):
        self.behaviour, self.prompt = WEB_BEHAVIOUR_AUTO, None
        self.silent_chunks = 0
        self.apply({"behaviour": behaviour} if prompt is None else {"prompt": prompt})

    def apply(self, message: dict) -> None:
        """A control message: {"behaviour": "auto" | one of BEHAVIOURS} or {"prompt": "free text"} ("" clears)."""
        if not isinstance(message, dict) or not ({"behaviour", "prompt"} & message.keys()):
            raise ControlError('expected {"behaviour": ...} or {"prompt": ...}')
        if "behaviour" in message:
            value = message["behaviour"]
            if value != WEB_BEHAVIOUR_AUTO and value not in BEHAVIOURS:
                raise ControlError(f"unknown behaviour {str(value)[:40]!r}: one of {WEB_BEHAVIOUR_AUTO}, "
                                   f"{', '.join(BEHAVIOURS)}")
            self.behaviour, self.prompt = value, None
        if "prompt" in message:
            value = message["prompt"]
            if not isinstance(value, str) or len(value.encode("utf-8")) > MAX_PROMPT_BYTES:
                raise ControlError(f"prompt: text of at most {MAX_PROMPT_BYTES} UTF-8 bytes")
            if any(ord(c) < 32 and c not in "\t\n" for c in value):
                raise ControlError("prompt: control characters are not allowed")
            self.prompt = value.strip() or None
            if self.prompt is None:
                self.behaviour = WEB_BEHAVIOUR_AUTO

    def next(self, chunk: Chunk) -> tuple[str | None, str | None]:
        """-> (BEHAVIOUR, PROMPT) for this chunk, exactly one of them set."""
        self.silent_chunks = 0 if chunk.rms >= SILENCE_RMS else self.silent_chunks + 1
        if self.prompt is not None:
            return None, self.prompt
        if self.behaviour != WEB_BEHAVIOUR_AUTO:
            return self.behaviour, None
        return ("idle" if self.silent_chunks >= IDLE_AFTER_CHUNKS else "speaking"), None

    @property
    def mode(self) -> str:
        return f"prompt: {self.prompt}" if self.prompt is not None else self.behaviour

    @property
    def kind(self) -> str:
        """The mode without the viewer's text (what operators may see)."""
        return "prompt" if self.prompt is not None else self.behaviour


class JitterSizer:
    """The jitter buffer a new session gets, from measurements: the p99 of how late chunks came back
    on this edge recently (all sessions), plus one frame, clamped; the measured default until enough
    chunks were seen.

    A chunk's lateness is its frames' arrival minus when its audio was due to be complete on the
    session's clock (chunk 0 complete + 0.48 s k): the server's round trip plus input jitter, what
    the buffer must absorb for chunk k's frames to be there when they are due."""

    def __init__(self, default_s: float = WEB_JITTER_BUFFER_S, window: int = 600, min_samples: int = 50):
        self.default_s = default_s
        self.recent: deque[float] = deque(maxlen=window)
        self.min_samples = min_samples

    def add(self, lateness_s: float) -> None:
        self.recent.append(lateness_s)

    def size(self) -> float:
        if len(self.recent) < self.min_samples:
            return self.default_s
        wanted = percentile(list(self.recent), 99) + 1 / FPS
        return float(min(MAX_JITTER_BUFFER_S, max(MIN_JITTER_BUFFER_S, wanted)))
