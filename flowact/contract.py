"""The serving contract: every name and limit that the server, its clients and its docs share.

Tensor and control names of the `flowact` ensemble, request limits, environment variables, serve
defaults and the metrics the `stream` model publishes are written here once. The specs, the
repository renderer, the stream model, the client, the load generator, the WebRTC edge, the chart
tests and the docs import them from here.

This module imports nothing but the standard library: a client, a probe or a load generator
reads it without torch.
"""

from __future__ import annotations

# --- models ---------------------------------------------------------------------------------------
ENSEMBLE_MODEL = "flowact"  # what clients call
STREAM_MODEL = "stream"  # the stateful python model inside the ensemble

# --- client-facing tensors of the ensemble (name -> Triton wire dtype) ----------------------------
AUDIO = "AUDIO"  # float32 (1, 7680): 0.48 s of 16 kHz mono, every request
REF_IMAGE = "REF_IMAGE"  # uint8 (1, H, W, 3), with START (unless RESUME)
SEED = "SEED"  # int64 (1, 1), with START, optional
PROMPT = "PROMPT"  # BYTES (1, 1): free-text action, optional, any request
BEHAVIOUR = "BEHAVIOUR"  # BYTES (1, 1): one of BEHAVIOURS, optional, any request
RESUME = "RESUME"  # uint8 (1, n): a SNAPSHOT to continue from, with START (an input must not share an output's name)
WANT_SNAPSHOT = "WANT_SNAPSHOT"  # bool (1, 1): answer with SNAPSHOT
FRAMES = "FRAMES"  # output uint8 (1, 12, H, W, 3)
CHUNK_INDEX = "CHUNK_INDEX"  # output int64 (1, 1)
SNAPSHOT = "SNAPSHOT"  # output uint8 (1, n): the stream's signed state after this chunk, empty unless asked

WIRE_DTYPES = {AUDIO: "FP32", REF_IMAGE: "UINT8", SEED: "INT64", PROMPT: "BYTES", BEHAVIOUR: "BYTES",
               RESUME: "UINT8", WANT_SNAPSHOT: "BOOL", FRAMES: "UINT8", CHUNK_INDEX: "INT64", SNAPSHOT: "UINT8"}
START_ONLY_INPUTS = (REF_IMAGE, SEED, RESUME)

# Sequence-batcher controls (Triton sets them from the client's sequence_start / sequence_end).
START = "START"
END = "END"

# --- request rules --------------------------------------------------------------------------------
BEHAVIOURS = ("speaking", "listening", "thinking", "idle")
DEFAULT_PROMPT = "speaking"  # a stream's conditioning text when START names none
MAX_PROMPT_BYTES = 1024  # PROMPT / BEHAVIOUR text, UTF-8
MAX_TEXT_WIRE_BYTES = 4 * 1024  # refused before decoding
MAX_SEED = 2**63 - 1
MAX_AUDIO_MAGNITUDE = 1.0e3  # |sample| above this is refused as absurd

# --- environment ----------------------------------------------------------------------------------
SNAPSHOT_KEY_ENV = "FLOWACT_SNAPSHOT_KEY"  # HMAC key shared by every replica; unset: snapshots off
DRAIN_FILE_ENV = "FLOWACT_DRAIN_FILE"  # while this file exists the stream model refuses new streams
CHECKPOINTS_ENV = "FLOWACT_CHECKPOINTS"  # where the shipped checkpoints are
TRITONSERVER_ENV = "FLOWACT_TRITONSERVER"  # another tritonserver binary (the NGC image's)

# --- serve defaults -------------------------------------------------------------------------------
DEFAULT_HOST = "127.0.0.1"  # loopback unless told otherwise
DEFAULT_GRPC_PORT = 8001
DEFAULT_HTTP_PORT = 8000
DEFAULT_METRICS_PORT = 8002
DEFAULT_CAPACITY = 4  # streams admitted at once
DEFAULT_IDLE_TTL_S = 30.0  # a stream with no request for this long is freed
DEFAULT_DRAIN_FILE = "/tmp/flowact/draining"
DEFAULT_URL = f"{DEFAULT_HOST}:{DEFAULT_GRPC_PORT}"

# --- metrics the stream model publishes (name -> kind, help); the chart's contract ---------------
ACTIVE_STREAMS = "flowact_active_streams"
STREAM_CAPACITY = "flowact_stream_capacity"
DRAINING = "flowact_draining"
CHUNKS_TOTAL = "flowact_chunks_total"
CHUNK_SECONDS_SUM = "flowact_chunk_latency_seconds_sum"
CHUNK_SECONDS_COUNT = "flowact_chunk_latency_seconds_count"
TTFF_SECONDS_SUM = "flowact_ttff_seconds_sum"
TTFF_SECONDS_COUNT = "flowact_ttff_seconds_count"

METRICS = {
    ACTIVE_STREAMS: ("GAUGE", "streams with state on this server"),
    STREAM_CAPACITY: ("GAUGE", "streams this server admits"),
    DRAINING: ("GAUGE", "1 while the server refuses new streams"),
    CHUNKS_TOTAL: ("COUNTER", "chunks generated"),
    "flowact_streams_rejected_total": ("COUNTER", "STARTs refused (capacity, draining)"),
    "flowact_streams_evicted_total": ("COUNTER", "streams freed by the idle TTL"),
    "flowact_streams_started_total": ("COUNTER", "streams admitted (fresh or resumed)"),
    "flowact_streams_resumed_total": ("COUNTER", "streams admitted from a snapshot"),
    "flowact_streams_ended_total": ("COUNTER", "streams freed by END or by a failed chunk"),
    "flowact_requests_invalid_total": ("COUNTER", "requests refused for their content (bad input)"),
    CHUNK_SECONDS_SUM: ("COUNTER", "seconds spent generating chunks (stream model)"),
    CHUNK_SECONDS_COUNT: ("COUNTER", "chunks timed"),
    TTFF_SECONDS_SUM: ("COUNTER", "seconds from START to its first chunk (stream model)"),
    TTFF_SECONDS_COUNT: ("COUNTER", "streams timed"),
}

# --- stream ownership, refusals and stops ---------------------------------------------------------
# A stream's id is its capability: whoever holds it can feed, read (as a second client without an
# image) and END that stream. The shipped clients draw ids of STREAM_ID_BYTES random bytes (hex).
STREAM_ID_BYTES = 16  # 128 random bits: secrets.token_hex(16), 32 characters
REQUIRE_RANDOM_IDS_ENV = "FLOWACT_REQUIRE_RANDOM_IDS"  # "1": START refuses integer ids and short string ids
MIN_RANDOM_ID_CHARS = 2 * STREAM_ID_BYTES  # the shortest string id a START may use when random ids are required
# Triton's sequence idle timeout is set above the stream model's own TTL, so the model evicts first
# and can name the eviction: Triton's timeout = max(TTL * factor, TTL + margin).
TRITON_IDLE_FACTOR = 2.0
TRITON_IDLE_MARGIN_S = 5.0
# Candidate sequence slots beyond capacity: a refused START that never sends END holds one slot
# until Triton's idle timeout; this many of them (at once) delay no other START.
CANDIDATE_HEADROOM = 1024
GONE_MEMORY = 4096  # evicted / evacuated stream ids the model remembers, to name why they are gone
# The drain file's content says why new streams are refused (empty: `flowact drain`, the preStop hook).
DRAIN_STOPPING = "stopping"  # `flowact serve` got SIGTERM: no new streams, active ones finish
DRAIN_EVACUATE = "evacuate"  # the drain timeout passed: active streams are ended, to resume elsewhere
DEFAULT_DRAIN_TIMEOUT_S = 30.0  # `flowact serve --drain-timeout`: how long active streams may finish after SIGTERM
EVACUATE_GRACE_S = 2.0  # after the drain timeout, how long streams get to receive "resume elsewhere"
LAUNCHER_GUARD_KILL_S = 3.0  # launcher gone: the guard SIGTERMs the server group, SIGKILLs it after this
