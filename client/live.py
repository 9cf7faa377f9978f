"""A live avatar stream for asyncio processes (the WebRTC edge's sessions, the voice-agent avatar): chunks
go in as they are made, frames come out as they come back, and the stream survives its replica.

The owner `put`s chunk i (its audio and conditioning, decided once) as the clock makes it and `end`s the
stream; `run()` sends them over one gRPC stream and hands each chunk's frames to `on_frames` exactly
once, in order. When the replica goes away (the stream breaks, the server refuses with a cause in
FAILOVER_REFUSALS, or a chunk stays unanswered for `upstream_timeout_s`: a hung replica) and a
FailoverPolicy is given, it continues on whichever replica the address reaches now (a gateway): a fresh
stream id, START with RESUME = the latest snapshot (asked every K chunks; chunk 0 tells whether the server
has a snapshot key) or, without one, a fresh START with the same image and seed, then the chunks since
once more. Retries back off with jitter within the policy's bounds; each failover is told to
`on_failover` when its first new chunk arrives. What it cannot continue ends `run()` with StreamError.

This is the asyncio twin of `AvatarStream.run` (flowact.client.stream, threads, a known list of chunks):
the policy, the refusal causes and the failover record are that module's.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Callable

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

from flowact.client.stream import (Failover, FailoverPolicy, Outage, ReplicaGone, StreamError, make_inputs,
                                   new_stream_id, refusal_cause)
from flowact.contract import (ALREADY_ACTIVE, ENSEMBLE_MODEL, FAILOVER_CONNECTION_LOST, FRAMES, HANG_UP_WAIT_S,
                              HUNG_UP, LIVE_UPSTREAM_TIMEOUT_S, MAX_SEED, SNAPSHOT, SNAPSHOTS_DISABLED)

POLL_S = 0.04  # how often a wait for an answer looks at the oldest unanswered chunk
RECONNECT_BACKOFF_MAX_S = 1.0  # the gRPC reconnect backoff never grows past this
MAX_REPLAY_CHUNKS = 250  # without snapshots (a server with no key) a stream keeps this much audio (2 min) to fail over
FAILOVER_NO_ANSWER = "no answer"  # the failover cause of a chunk unanswered for upstream_timeout_s (a hung replica)


def upstream_client(url: str) -> aioclient.InferenceServerClient:
    """A gRPC client of its own: its own subchannel (gRPC otherwise shares one per address between all
    channels, with one reconnect backoff that grows to 120 s while the server is down), whose backoff
    stays under RECONNECT_BACKOFF_MAX_S, so a server that comes back is reached at once."""
    backoff_ms = int(RECONNECT_BACKOFF_MAX_S * 1000)
    return aioclient.InferenceServerClient(url, channel_args=[
        ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
        ("grpc.use_local_subchannel_pool", 1), ("grpc.initial_reconnect_backoff_ms", min(250, backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(250, backoff_ms)), ("grpc.max_reconnect_backoff_ms", backoff_ms)])


class SnapshotsOff(RuntimeError):
    """The server has no snapshot key: it refused the START that asked for a snapshot."""


class LiveStream:
    def __init__(self, url: str, image: np.ndarray, on_frames: Callable[[int, np.ndarray, float], None],
                 on_failover: Callable[[Failover], None] = lambda failover: None, *, model: str = ENSEMBLE_MODEL,
                 seed: int | None = None, failover: FailoverPolicy | None = FailoverPolicy(),
                 upstream_timeout_s: float = LIVE_UPSTREAM_TIMEOUT_S, id_prefix: str = "", name: str = "the stream"):
        self.url, self.image, self.model = url, image, model  # image: (H, W, 3) uint8
        self.on_frames, self.on_failover = on_frames, on_failover  # on_frames(k, (12, H, W, 3) uint8, arrival)
        self.seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed  # a replay from 0 makes the same frames
        self.failover = failover  # None: a lost replica ends the stream
        self.upstream_timeout_s = upstream_timeout_s
        self.id_prefix, self.name = id_prefix, name  # name: what messages call the stream instead of its id
        self.stream_id = self._new_id()  # a fresh one after each failover
        self.failovers: list[Failover] = []
        self.chunks_sent = 0  # chunks sent at least once
        self.attempting = False  # a gRPC stream is open: END can go out on it
        # chunk -> (audio, behaviour, prompt), kept until a snapshot covers it (without snapshots, for a
        # replay from chunk 0: at most MAX_REPLAY_CHUNKS)
        self._kept: dict[int, tuple] = {}
        self._made = asyncio.Event()  # a chunk was put, or END, or a hang-up: the requests go on
        self._ending = False  # end() was called: the chunks put so far, then a hang-up
        self._abandon = False  # this attempt's START was refused: hang its id up at once
        self._snapshot: tuple[int, bytes] | None = None  # (the chunk it follows, the signed state)
        self._snapshots_on = failover is not None and failover.snapshot_every > 0
        self._replayable = True  # without a snapshot, every chunk since 0 is still kept
        self._sent_at: dict[int, float] = {}  # chunk -> when it went out, until answered
        self._delivered = 0  # chunks handed to on_frames
        self._last_delivery: float | None = None
        self._outage: Outage | None = None  # a failover whose first new chunk has not come yet

    def _new_id(self) -> str:
        return self.id_prefix + new_stream_id()

    def scrub(self, text: str) -> str:
        """A server message as a viewer or a log may see it: without the gRPC stream id (a capability)."""
        return text.replace(self.stream_id, self.name)

    def put(self, index: int, audio: np.ndarray, behaviour: str | None, prompt: str | None) -> None:
        """Chunk `index` (0, 1, 2, ...), its (7680,) float32 audio and conditioning."""
        self._kept[index] = (audio, behaviour, prompt)
        self._made.set()

    def end(self) -> None:
        """END after the chunks put so far: a hang-up (contract.HUNG_UP), which generates nothing."""
        self._ending = True
        self._made.set()

    async def _requests(self, start_at: int):
        """One gRPC stream's requests: START with chunk `start_at` (RESUME = the snapshot before it, or the
        image and seed at chunk 0), the kept chunks after it once more, then new ones as they are put; a
        hang-up last (END without audio). Chunks are read, never taken: a stale stream's reader steals none."""
        snapshots = self._snapshots_on
        outputs = [grpcclient.InferRequestedOutput(name) for name in ((FRAMES, SNAPSHOT) if snapshots else (FRAMES,))]
        i = start_at
        while True:
            while i not in self._kept and not self._ending and not self._abandon:
                self._made.clear()
                await self._made.wait()
            if self._abandon or i not in self._kept:
                if i > start_at:  # a START went out on this call: hang its id up
                    yield {"model_name": self.model, "sequence_id": self.stream_id, "sequence_end": True, "inputs": []}
                return
            audio, behaviour, prompt = self._kept[i]
            self.chunks_sent = max(self.chunks_sent, i + 1)
            first = i == start_at
            resume = self._snapshot[1] if first and self._snapshot is not None else None
            fresh = first and resume is None
            self._sent_at[i] = time.monotonic()
            yield {"model_name": self.model, "outputs": outputs, "sequence_id": self.stream_id, "sequence_start": first,
                   "inputs": make_inputs(audio, self.image if fresh else None, self.seed if fresh else None, prompt,
                                         behaviour, resume, snapshots and i % self.failover.snapshot_every == 0)}
            i += 1

    async def _attempt(self, start_at: int) -> None:
        """One gRPC stream from chunk `start_at` until END is answered. Its n-th answer is chunk start_at + n;
        chunks delivered already (a replay) are not delivered again. ReplicaGone when the replica goes away,
        says so or hangs; StreamError for any other refusal."""
        client = upstream_client(self.url)
        self._abandon = False
        responses = client.stream_infer(self._requests(start_at))
        n = start_at
        try:
            while True:
                result, error = await self._next_answer(responses)
                if result is None and error is None:
                    return  # the call ended (after END)
                if error is not None:
                    message = self.scrub(error.message() if hasattr(error, "message") else str(error))
                    if self._ending and HUNG_UP in message:
                        continue  # the END's answer: the call ends next
                    if ALREADY_ACTIVE not in message:  # the id is ours: free it there now, not at its idle timeout
                        await self._hang_up(responses)
                    cause = refusal_cause(message)
                    if cause is not None:
                        raise ReplicaGone(f"the server refused chunk {n}: {message}", cause)
                    if SNAPSHOTS_DISABLED in message and n == start_at == 0:
                        raise SnapshotsOff(message)
                    raise StreamError(f"the server refused chunk {n}: {message}")
                if self._ending:
                    continue  # ending: frames are no longer wanted
                self._sent_at.pop(n, None)
                snapshot = result.as_numpy(SNAPSHOT)
                if snapshot is not None and snapshot.size:  # (1, bytes): the state after chunk n
                    self._snapshot = (n, snapshot[0].tobytes())
                    for done in [i for i in self._kept if i <= n]:
                        del self._kept[done]
                if n == self._delivered:
                    self._deliver(n, result.as_numpy(FRAMES)[0], time.monotonic())  # (12, H, W, 3)
                n += 1
        except grpc.aio.AioRpcError as e:  # the stream broke: the replica (or the way to it) is gone
            raise ReplicaGone(f"connection to the server lost at chunk {n}: {e.details()}", FAILOVER_CONNECTION_LOST) from None
        finally:
            responses.cancel()
            await client.close()

    async def _hang_up(self, responses) -> None:
        """After a refusal: a hang-up goes out instead of the next chunk; its answer (and those of the chunks
        in flight before it) are read for up to HANG_UP_WAIT_S."""
        self._abandon = True
        self._made.set()
        try:
            await asyncio.wait_for(self._read_to_end(responses), HANG_UP_WAIT_S)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError):
            pass

    @staticmethod
    async def _read_to_end(responses) -> None:
        async for _ in responses:
            pass

    async def _next_answer(self, responses) -> tuple:
        """The call's next (result, error), or (None, None) at its end; ReplicaGone when a chunk sent has
        waited longer than upstream_timeout_s (looked at every POLL_S, without cancelling the read)."""
        answer = asyncio.ensure_future(responses.__anext__())
        while True:
            done, _ = await asyncio.wait({answer}, timeout=POLL_S)
            if done:
                try:
                    return answer.result()
                except StopAsyncIteration:
                    return None, None
            waiting = min(self._sent_at.items(), key=lambda kv: kv[1], default=None)
            if waiting is not None and time.monotonic() - waiting[1] > self.upstream_timeout_s:
                answer.cancel()
                raise ReplicaGone(f"the server did not answer chunk {waiting[0]} within {self.upstream_timeout_s:.1f} s",
                                  FAILOVER_NO_ANSWER)

    def _deliver(self, n: int, frames: np.ndarray, now: float) -> None:
        self._delivered += 1
        self._last_delivery = now
        if self._snapshot is None and len(self._kept) > MAX_REPLAY_CHUNKS:  # no snapshot to resume from
            self._kept.pop(min(self._kept))
            self._replayable = False
        if self._outage is not None:  # the first new chunk after a failover: what it cost
            o, self._outage = self._outage, None
            failover = Failover(o.cause, o.message, o.at_chunk, o.resumed_from, max(0, o.sent - o.resumed_from),
                                o.attempts, now - o.since)
            self.failovers.append(failover)
            self.on_failover(failover)
        self.on_frames(n, frames, now)

    async def run(self) -> None:
        """Attempts, and between them the failover, until END is answered. StreamError: the stream cannot go on."""
        start_at, outage = 0, None
        while True:
            try:
                self.attempting = True
                await self._attempt(start_at)
                return
            except SnapshotsOff:  # a server without a snapshot key: the same START without asking for one
                self._snapshots_on = False
                self.stream_id = self._new_id()
            except ReplicaGone as e:
                self.attempting = False
                if self._ending:
                    return  # the stream is ending: there is nothing to move to another replica
                now = time.monotonic()
                if outage is None or self._delivered > outage.at_chunk:  # a new failover (the last one is over)
                    outage = Outage(e.cause, str(e), self._delivered, self._last_delivery or now, now, self.chunks_sent)
                outage.attempts += 1
                if self.failover is None:
                    raise StreamError(f"{e} (failover is off)") from None
                if self._snapshot is None and not self._replayable:
                    raise StreamError(f"{e} (no snapshot to resume from: the server has no snapshot key, and more than "
                                      f"{MAX_REPLAY_CHUNKS} chunks passed)") from None
                if outage.attempts > self.failover.max_attempts or now - outage.started > self.failover.max_seconds:
                    raise StreamError(f"{e} (failover gave up after {outage.attempts} attempts, "
                                      f"{now - outage.started:.0f} s)") from None
                self._outage = outage
                self._sent_at.clear()
                await asyncio.sleep(self.failover.delay(outage.attempts - 1))
                self.stream_id = self._new_id()
                start_at = self._snapshot[0] + 1 if self._snapshot is not None else 0
                outage.resumed_from = start_at
