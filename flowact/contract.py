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
DRAIN_FILE_ENV = "FLOWACT_DRAIN_FILE"  # while this file exists the stream model refuses new streams (flowact.serving.drain)
CHECKPOINTS_ENV = "FLOWACT_CHECKPOINTS"  # where the shipped checkpoints are
TRITONSERVER_ENV = "FLOWACT_TRITONSERVER"  # another tritonserver binary (the NGC image's)

# --- serve defaults -------------------------------------------------------------------------------
DEFAULT_HOST = "127.0.0.1"  # loopback unless told otherwise
DEFAULT_GRPC_PORT = 8001
DEFAULT_HTTP_PORT = 8000
DEFAULT_METRICS_PORT = 8002
DEFAULT_CAPACITY = 4  # streams admitted at once
DEFAULT_IDLE_TTL_S = 30.0  # a stream with no request for this long is freed
DEFAULT_URL = f"{DEFAULT_HOST}:{DEFAULT_GRPC_PORT}"
ARTIFACTS_DIR = "artifacts"  # where the CLI puts exports, repositories and the server's work dir (relative to the cwd)
DEFAULT_HEALTH_PORT = 8003  # `flowact serve --health-port`: GET /ready (new streams welcome?) and /live, for gateways
HEALTH_READY_PATH = "/ready"  # 200 "ready (a/c streams)", 503 "not ready: draining | at capacity (a/c) | triton not ready"
HEALTH_LIVE_PATH = "/live"  # 200 while Triton is live

# --- the gateway (`flowact gateway`: Envoy in front of the replicas) -------------------------------
DEFAULT_GATEWAY_LISTEN = f"{DEFAULT_HOST}:9001"
GATEWAY_MAX_REQUEST_BYTES = 8 * 1024 * 1024  # the largest legitimate request is r1-480p's full START, 4.6 MB (README "Request size")
GATEWAY_HEALTH_INTERVAL_S = 1.0  # Envoy's active check of each replica's /ready

# --- metrics the stream model publishes (name -> kind, help); the chart's contract ---------------
ACTIVE_STREAMS = "flowact_active_streams"
STREAM_CAPACITY = "flowact_stream_capacity"
DRAINING = "flowact_draining"
CHUNKS_TOTAL = "flowact_chunks_total"
STREAMS_REJECTED = "flowact_streams_rejected_total"
STREAMS_EVICTED = "flowact_streams_evicted_total"
STREAMS_STARTED = "flowact_streams_started_total"
STREAMS_RESUMED = "flowact_streams_resumed_total"
STREAMS_ENDED = "flowact_streams_ended_total"
REQUESTS_INVALID = "flowact_requests_invalid_total"
CHUNK_SECONDS_SUM = "flowact_chunk_latency_seconds_sum"
CHUNK_SECONDS_COUNT = "flowact_chunk_latency_seconds_count"
TTFF_SECONDS_SUM = "flowact_ttff_seconds_sum"
TTFF_SECONDS_COUNT = "flowact_ttff_seconds_count"

METRICS = {
    ACTIVE_STREAMS: ("GAUGE", "streams with state on this server"),
    STREAM_CAPACITY: ("GAUGE", "streams this server admits"),
    DRAINING: ("GAUGE", "1 while the server refuses new streams"),
    CHUNKS_TOTAL: ("COUNTER", "chunks generated"),
    STREAMS_REJECTED: ("COUNTER", "STARTs refused (capacity, draining)"),
    STREAMS_EVICTED: ("COUNTER", "streams freed by the idle TTL"),
    STREAMS_STARTED: ("COUNTER", "streams admitted (fresh or resumed)"),
    STREAMS_RESUMED: ("COUNTER", "streams admitted from a snapshot"),
    STREAMS_ENDED: ("COUNTER", "streams freed by END or by a failed chunk"),
    REQUESTS_INVALID: ("COUNTER", "requests refused for their content (bad input)"),
    CHUNK_SECONDS_SUM: ("COUNTER", "seconds spent generating chunks (stream model)"),
    CHUNK_SECONDS_COUNT: ("COUNTER", "chunks timed"),
    TTFF_SECONDS_SUM: ("COUNTER", "seconds from START to its first chunk (stream model)"),
    TTFF_SECONDS_COUNT: ("COUNTER", "streams timed"),
}

# --- operator access: the admin key --------------------------------------------------------------
# `flowact serve` restricts the admin protocols (model-repository, model-config, shared-memory,
# logging, trace, statistics) behind this key: from $FLOWACT_ADMIN_KEY or --admin-key-file, else a
# random key per start that nobody holds. Triton's restricted-key name is ADMIN_KEY_NAME; the
# header a client sends is that name over HTTP and "triton-grpc-protocol-" + that name over gRPC.
ADMIN_KEY_ENV = "FLOWACT_ADMIN_KEY"
ADMIN_KEY_NAME = "admin-key"
ADMIN_KEY_HTTP_HEADER = ADMIN_KEY_NAME
ADMIN_KEY_GRPC_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_NAME}"
ADMIN_KEY_MIN_CHARS = 16  # an operator key shorter than this is refused
ADMIN_KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~+/=-"  # safe in a flag and a header

# --- the WebRTC edge (`flowact web`, package flowact.web) -----------------------------------------
# Signaling (WHIP/WHEP style): POST WEB_SESSIONS_PATH with an SDP offer (application/sdp) -> 201, the
# SDP answer and Location: WEB_SESSIONS_PATH/<id>; DELETE that location ends the session.
WEB_SESSIONS_PATH = "/v1/sessions"
WEB_SDP_TYPE = "application/sdp"
WEB_BEHAVIOUR_AUTO = "auto"  # ?behaviour= and the data channel: speaking while the voice is active, idle after a silence
LIVE_UPSTREAM_TIMEOUT_S = 3.0  # a live stream's chunk unanswered this long (~6 chunks): its replica hangs (flowact.client.live)
WEB_CONNECT_TIMEOUT_S = 20.0  # a session whose viewer has not connected (ICE + DTLS) by then is ended
# Jitter buffer: chunk k's first frame plays when chunk 0's audio was complete + 0.48 s k + this delay.
# Default: the measured p99 lateness of a chunk's frames on that clock (server round trip + input
# jitter; tiny, 1-2 sessions, the shared 2-core machine at load average ~10: p50 35 ms, p99 184 ms)
# plus one frame. Once the edge has seen 50 chunks, each new session takes the p99 of the edge's
# recent 600 chunks plus one frame, clamped (flowact.web.timeline.JitterSizer).
WEB_JITTER_BUFFER_S = 0.22

# the edge's own /metrics (prometheus-client; histograms add _bucket/_sum/_count)
WEB_SESSIONS_ACTIVE = "flowact_web_sessions_active"
WEB_SESSIONS_STARTED = "flowact_web_sessions_started_total"
WEB_SESSIONS_REJECTED = "flowact_web_sessions_rejected_total"
WEB_SESSIONS_FAILED = "flowact_web_sessions_failed_total"
WEB_FAILOVERS = "flowact_web_failovers_total"
WEB_FRAMES_SENT = "flowact_web_frames_sent_total"
WEB_FRAMES_LATE = "flowact_web_frames_late_total"
WEB_SILENCE_FILLED = "flowact_web_silence_filled_seconds_total"
WEB_TTFF = "flowact_web_ttff_seconds"
WEB_MOUTH_LATENCY = "flowact_web_mouth_latency_seconds"
WEB_AUDIO_DELAY = "flowact_web_audio_delay_seconds"
WEB_CHUNK_READY = "flowact_web_chunk_ready_seconds"
WEB_AV_OFFSET = "flowact_web_av_offset_seconds"
WEB_JITTER_BUFFER = "flowact_web_jitter_buffer_seconds"

WEB_METRICS = {  # name -> (kind, help)
    WEB_SESSIONS_ACTIVE: ("GAUGE", "viewer sessions open on this edge"),
    WEB_SESSIONS_STARTED: ("COUNTER", "viewer sessions admitted"),
    WEB_SESSIONS_REJECTED: ("COUNTER", "session offers refused (edge at --max-sessions, bad offer)"),
    WEB_SESSIONS_FAILED: ("COUNTER", "sessions ended by an error (server refused or gone, ICE failed)"),
    WEB_FAILOVERS: ("COUNTER", "sessions moved to another replica (resumed from their last snapshot)"),
    WEB_FRAMES_SENT: ("COUNTER", "video frames handed to the WebRTC encoder"),
    WEB_FRAMES_LATE: ("COUNTER", "frames not there when due (the previous frame was repeated)"),
    WEB_SILENCE_FILLED: ("COUNTER", "input audio replaced by silence (late or absent)"),
    WEB_TTFF: ("HISTOGRAM", "session offer received -> first video frame leaves the edge"),
    WEB_MOUTH_LATENCY: ("HISTOGRAM", "a chunk's audio complete at the edge -> its first frame leaves the edge"),
    WEB_AUDIO_DELAY: ("HISTOGRAM", "delay applied to the returned speech so that lips and sound match (per session)"),
    WEB_CHUNK_READY: ("HISTOGRAM", "a chunk's audio complete at the edge -> its frames back from the server"),
    WEB_AV_OFFSET: ("HISTOGRAM", "a chunk's first audio sample leaves minus its first frame leaves the edge"),
    WEB_JITTER_BUFFER: ("HISTOGRAM", "jitter buffer chosen per session"),
}

# --- stream ownership, refusals and stops ---------------------------------------------------------
# A stream's id is its capability: whoever holds it can feed, read (as a second client without an
# image) and END that stream. The shipped clients draw ids of STREAM_ID_BYTES random bytes (hex).
STREAM_ID_BYTES = 16  # 128 random bits: secrets.token_hex(16), 32 characters
REQUIRE_RANDOM_IDS_ENV = "FLOWACT_REQUIRE_RANDOM_IDS"  # "1": START refuses integer ids and short string ids
MIN_RANDOM_ID_CHARS = 2 * STREAM_ID_BYTES  # the shortest string id a START may use when random ids are required
MIN_RANDOM_ID_BITS = 64  # and its estimated randomness (flowact.serving.streams.id_entropy_bits)
# Triton's sequence idle timeout is set above the stream model's own TTL, so the model evicts first
# and can name the eviction: Triton's timeout = max(TTL * factor, TTL + margin).
TRITON_IDLE_FACTOR = 2.0
TRITON_IDLE_MARGIN_S = 5.0
# Candidate sequence slots beyond capacity: a refused START that never sends END holds one slot
# until Triton's idle timeout; this many of them (at once) delay no other START.
CANDIDATE_HEADROOM = 1024
# A hang-up is a request with END and no AUDIO: the stream (if any) ends at once, nothing is generated, and
# Triton frees the id's sequence slot. Its answer is an error that contains HUNG_UP (an ensemble answer
# has frames or an error). The shipped clients hang up an id whose START was refused (but "already
# active": not theirs) and a stream they give up while it is open; a server stops only after such slots
# are gone (Triton counts them as in-flight inferences until its exit timeout).
HUNG_UP = "hung up (END without AUDIO): the stream ended here, no frames"
HANG_UP_WAIT_S = 3.0  # how long a client waits for its hang-up's answer (chunks in flight answer first)
ALREADY_ACTIVE = "is already active"  # a START's refusal for an id in use: not the sender's to hang up
GONE_MEMORY = 4096  # evicted / evacuated stream ids the model remembers, to name why they are gone
# The drain file's content says why new streams are refused (empty: `flowact drain`, the preStop hook).
DRAIN_STOPPING = "stopping"  # `flowact serve` got SIGTERM: no new streams, active ones finish
DRAIN_EVACUATE = "evacuate"  # the drain timeout passed: active streams are ended, to resume elsewhere
DEFAULT_DRAIN_TIMEOUT_S = 30.0  # `flowact serve --drain-timeout`: how long active streams may finish after SIGTERM
EVACUATE_GRACE_S = 2.0  # after the drain timeout, how long streams get to receive "resume elsewhere"
LAUNCHER_GUARD_KILL_S = 3.0  # launcher gone: the guard SIGTERMs the server group, SIGKILLs it after this

# --- client failover (`AvatarStream(failover=...)`, `flowact stream`, the load generator) -----------
# A stream whose replica goes away continues by itself: the client opens a new gRPC stream to the same
# address (a gateway in production), STARTs with RESUME = its last SNAPSHOT (or, before the first one,
# a fresh START with the same image and seed) and re-sends the chunks the snapshot does not cover.
# Snapshots are asked on every FAILOVER_SNAPSHOT_EVERY-th chunk (0, K, 2K, ...): a snapshot is one
# fixed size per preset (tiny 108,529 bytes, cpu 211,441, r1-480p 3,330,545) against 12 frames of
# 147,456 / 589,824 / 14,376,960 bytes a chunk, so K = 4 adds 18 % / 9 % / 5.8 % to what a stream
# receives, and a failover re-sends at most K chunks plus those in flight.
FAILOVER_SNAPSHOT_EVERY = 4  # the other limits of a failover: flowact.client.stream.FailoverPolicy
# What makes a client fail over: the gRPC stream broke (any gRPC status), or the server's answer
# contains a refusal below, in any case (texts of flowact.serving.streams, the stream model and Triton).
FAILOVER_CONNECTION_LOST = "connection lost"
FAILOVER_REFUSALS = {  # lower-case text in the server's message -> cause
    "server is stopping": "stopping",  # also Triton's own "Server is stopping, scheduler ... stopped accepting"
    "server is draining": "draining",
    "at capacity": "capacity",
    "is not healthy": "replica failed",  # Triton: "Stub process '...' is not healthy" (the replica stops)
    "has no available versions": "stopping",  # Triton unloading its models at the end of a stop
}
SNAPSHOTS_DISABLED = "snapshots are disabled"  # a server without FLOWACT_SNAPSHOT_KEY: fail over by replaying from chunk 0

# --- voice-agent integrations (flowact.integrations: Pipecat, LiveKit Agents) ----------------------
# The agent's speech is put on the stream's timeline at real time (its TTS may run ahead); chunk k's
# frames and speech leave at chunk 0 complete + 0.48 s k + the jitter buffer, as on the edge.
AGENT_JITTER_BUFFER_S = WEB_JITTER_BUFFER_S
# A speech frame's metadata (Pipecat) or user data (LiveKit): its first sample on the stream's timeline (plays
# at origin + s / 16000).
AGENT_SAMPLE_KEY = "flowact_sample"
