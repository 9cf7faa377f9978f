"""Triton `stream` model: the stateful heart of the ensemble (python backend, sequence batching).

This file only adapts: it turns Triton requests into sampler calls and answers every request.
Sessions, admission, drain and eviction live in flowact.serving.streams; the chunk maths and the
per-stream state in flowact.session. The networks but the decoder run here, beside the state, by
the parameter `runtime`:
    onnx   ONNX Runtime on the CPU, the export directory `source` (target embedded)
    torch  PyTorch on `device` (target torch: CUDA bf16, or CPU fp32)
    trt    TensorRT plans from this model's directory (target trt)
Every per-stream tensor lives on `device`, in a pool of `capacity` slots allocated here (startup
fails, naming the numbers, if they do not fit); per chunk only the audio comes in and the latents
(or frames) go out.

Per request: AUDIO (7,680 float32 samples), optional PROMPT or BEHAVIOUR, WANT_SNAPSHOT; with
START also REF_IMAGE (or RESUME, a snapshot to continue a stream from) and an optional SEED. The
contract and its checks live in flowact.serving.streams.parse_request. The requests of many
streams arriving in one execute() run as one batch per network call. Outputs: LATENTS ([context |
chunk], decoded by the next ensemble step so decoding of chunk n overlaps denoising of chunk n+1),
or FRAMES when the repository is rendered `serial`; CHUNK_INDEX; SNAPSHOT (the stream's signed
state after this chunk when WANT_SNAPSHOT was set, else empty; flowact.snapshot).

Triton does not tell this model when a client goes away (measured on 2.51: requests of a
cancelled gRPC stream still arrive, none reports is_cancelled()); the idle TTL frees such streams.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from flowact.contract import (ACTIVE_STREAMS, CHUNK_INDEX, CHUNK_SECONDS_COUNT, CHUNK_SECONDS_SUM, CHUNKS_TOTAL,
                              DEFAULT_PROMPT, DRAIN_FILE_ENV, DRAINING, END, FRAMES, METRICS,
                              REQUIRE_RANDOM_IDS_ENV, RESUME, SNAPSHOT, SNAPSHOT_KEY_ENV, START, STREAM_CAPACITY,
                              TTFF_SECONDS_COUNT, TTFF_SECONDS_SUM, WANT_SNAPSHOT)
from flowact.presets import SAMPLES_PER_CHUNK, get_preset
from flowact.runtime import RuntimeKind, build_runners
from flowact.runtime.pytorch import cuda_context_lost, default_dtype, use_device
from flowact.session import InputError, PromptCache, StateCapacityError, StatePool, StreamSession, denoise_batch
from flowact.serving.repository import stream_inputs
from flowact.serving.streams import STOPPING, StreamRegistry, parse_request, scalar
from flowact.serving.triton_tensors import output_tensor
from flowact.snapshot import SnapshotCodec, key_from_env, max_snapshot_bytes, padded
from flowact.specs import network_specs

NO_SNAPSHOT = np.zeros((1, 0), dtype=np.uint8)
CONTEXT_LOST_EXIT_S = 1.0  # after a lost CUDA context: time for the refusals to reach Triton before the stub exits


def parameter(config: dict, key: str) -> str:
    try:
        return config["parameters"][key]["string_value"]
    except KeyError:
        raise pb_utils.TritonModelException(f"stream model config lacks parameter {key!r}") from None


def optional_input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.preset = get_preset(parameter(config, "preset"))
        self.output_name = parameter(config, "output")  # LATENTS (pipelined) or FRAMES (serial)
        capacity = int(parameter(config, "capacity"))
        runtime, device = parameter(config, "runtime"), use_device(parameter(config, "device"))
        self.device = device
        try:
            key = key_from_env()
        except ValueError as e:
            raise pb_utils.TritonModelException(str(e)) from None
        threads = int(parameter(config, "threads"))
        torch.set_num_threads(threads)
        self.runners = build_runners(runtime, self.preset, parameter(config, "source") or None, str(device), threads=threads)
        dtype = default_dtype(device)
        try:
            kv_dtype = dtype if runtime == RuntimeKind.TORCH else network_specs(self.preset)["denoiser_memory"].outputs[0].torch_dtype
            pool = StatePool(self.preset, capacity, device, dtype, check_fits=True, kv_dtype=kv_dtype)
        except StateCapacityError as e:
            raise pb_utils.TritonModelException(f"stream model: {e}") from None
        print(f"flowact stream model: {capacity} stream slots on {device} ({runtime}), {pool.describe_stream()}",
              flush=True)
        self.codec = None if key is None else SnapshotCodec(self.preset, key, RESUME, device.type)  # None: snapshots off
        self.max_snapshot_bytes = max_snapshot_bytes(self.preset, device.type)
        self.input_names = [i.name for i in stream_inputs(self.preset)]
        prompts = PromptCache(self.runners.text_encoder, self.preset, device, dtype)
        self.warm_up(StreamSession(self.preset, self.runners, device, dtype, prompts, pool.acquire()), pool)
        self.registry = StreamRegistry(
            capacity=capacity, idle_ttl_s=float(parameter(config, "idle_ttl_s")),
            new_session=lambda: StreamSession(self.preset, self.runners, device, dtype, prompts, pool.acquire()),
            release=lambda session: pool.release(session.state),
            drain_file=Path(os.environ[DRAIN_FILE_ENV]) if os.environ.get(DRAIN_FILE_ENV) else None,
            require_random_ids=os.environ.get(REQUIRE_RANDOM_IDS_ENV, "") == "1")
        self.metric_families = {  # must outlive their Metric objects
            name: pb_utils.MetricFamily(name=name, description=help_text, kind=getattr(pb_utils.MetricFamily, kind))
            for name, (kind, help_text) in METRICS.items()}
        self.metrics = {name: family.Metric(labels={"model": "stream", "preset": self.preset.name})
                        for name, family in self.metric_families.items()}
        self.metrics[STREAM_CAPACITY].set(capacity)
        self.reported = {}  # counter values already pushed to Triton
        self.metrics_lock = threading.Lock()
        self.stop = threading.Event()
        self.reaper = threading.Thread(target=self.reap_idle, daemon=True)
        self.reaper.start()

    def warm_up(self, session: StreamSession, pool: StatePool) -> None:
        """A throwaway stream, so that clients' chunks run warm (allocator arenas, kernels, the default
        prompt's tokens): until its memory is full (then attention without a mask: other kernels) and it
        has refined its memory once. Its slot goes back to the pool."""
        p = self.preset
        try:
            session.start(np.zeros((p.height, p.width, 3), dtype=np.uint8))
            for _ in range(max(p.long_term_size + 1, p.refine_every) + 1):  # the memory is full after 1 + long-term
                denoise_batch([session], [np.zeros(SAMPLES_PER_CHUNK, dtype=np.float32)], [None])
        finally:
            pool.release(session.state)

    def reap_idle(self):
        period = max(0.2, min(5.0, self.registry.idle_ttl_s / 4))
        while not self.stop.wait(period):
            if self.registry.evict_idle():
                self.publish_metrics()

    def publish_metrics(self):
        r = self.registry
        c = r.counters
        with self.metrics_lock:
            self.metrics[ACTIVE_STREAMS].set(r.active())
            self.metrics[DRAINING].set(1 if r.draining() else 0)
            for name, value in ((CHUNKS_TOTAL, c.chunks), ("flowact_streams_rejected_total", c.rejected),
                                ("flowact_streams_evicted_total", c.evicted),
                                ("flowact_streams_started_total", c.started),
                                ("flowact_streams_resumed_total", c.resumed),
                                ("flowact_streams_ended_total", c.ended),
                                ("flowact_requests_invalid_total", c.invalid),
                                (CHUNK_SECONDS_SUM, c.chunk_seconds), (CHUNK_SECONDS_COUNT, c.chunks),
                                (TTFF_SECONDS_SUM, c.ttff_seconds), (TTFF_SECONDS_COUNT, c.ttff_count)):
                delta = value - self.reported.get(name, 0)
                if delta:
                    self.metrics[name].increment(delta)
                    self.reported[name] = value

    def admit(self, request, start: bool, end: bool):
        """Validate one request and find (or start, or resume) its session -> (id, session, ChunkRequest)."""
        sid = request.correlation_id()
        req = parse_request({name: optional_input(request, name) for name in self.input_names}, start, end, self.preset,
                            self.max_snapshot_bytes)
        if self.codec is None and (req.want_snapshot or req.snapshot is not None):
            name = RESUME if req.snapshot is not None else WANT_SNAPSHOT
            raise InputError(f"{name}: snapshots are disabled on this server (it has no {SNAPSHOT_KEY_ENV})")
        if not req.start:
            return sid, self.registry.get(sid).session, req
        if req.snapshot is not None:  # resume: the snapshot replaces REF_IMAGE and SEED
            return sid, self.registry.resume(sid, lambda session: self.codec.restore(session, req.snapshot)), req
        return sid, self.registry.start(sid, req.ref_image, req.seed, req.prompt or DEFAULT_PROMPT), req

    def execute(self, requests):
        t0 = time.monotonic()
        responses = [None] * len(requests)
        batch, ends = [], []
        for i, request in enumerate(requests):
            try:
                start = bool(scalar(optional_input(request, START), START))
                end = bool(scalar(optional_input(request, END), END))
            except Exception as e:  # Triton sets the control inputs; this is not expected
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {e!r}"))
                continue
            if end:  # Triton has ended the sequence: free its state even if this request is refused
                ends.append(request.correlation_id())
            try:
                sid, session, req = self.admit(request, start, end)
                batch.append((i, sid, session, req))
            except Exception as e:  # every request gets an answer; InputError messages name the field
                self.registry.refused(e)
                message = str(e) if isinstance(e, InputError) else f"internal error in stream model: {e!r}"
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        if batch:
            try:
                out = self.generate([b[2] for b in batch], [b[3].audio for b in batch], [b[3].prompt for b in batch])
                seconds = time.monotonic() - t0
                for j, (i, sid, session, req) in enumerate(batch):
                    index = np.array([[session.chunk_index - 1]], dtype=np.int64)
                    snapshot = (np.frombuffer(padded(self.codec.encode(session), self.max_snapshot_bytes),
                                              dtype=np.uint8)[None] if req.want_snapshot else NO_SNAPSHOT)
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        output_tensor(self.output_name, out[j:j + 1]), pb_utils.Tensor(CHUNK_INDEX, index),
                        pb_utils.Tensor(SNAPSHOT, snapshot)])
                    self.registry.chunk_done(sid, seconds)
            except Exception as e:  # an engine failed: these streams' state is unknown, free them
                lost = cuda_context_lost(self.device)
                cause = (f"{STOPPING}, resume on another replica ({e})"
                         if self.registry.stopping() or "not ready" in str(e) or lost else str(e))
                if lost:  # every later call would fail too: answer, then exit so the launcher stops the replica
                    print(f"flowact stream model: the CUDA context of {self.device} is lost ({e}); exiting", flush=True)
                    threading.Timer(CONTEXT_LOST_EXIT_S, os._exit, (1,)).start()
                for i, sid, _, _ in batch:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"chunk generation failed, stream {sid!r} ended: {cause}"))
                    self.registry.end(sid)
        for sid in ends:
            self.registry.end(sid)
        self.publish_metrics()
        return responses

    def generate(self, sessions, audio, prompts) -> torch.Tensor:
        latents = denoise_batch(sessions, audio, prompts)  # (B, 1+3, 16, h, w) on the state's device
        if self.output_name == FRAMES:  # serial pipeline: decode here, before answering
            return self.runners.vae_decoder(latents)  # (B, 12, H, W, 3) uint8
        return latents.float()  # the decoder model's input dtype

    def finalize(self):
        self.stop.set()
        self.reaper.join(timeout=10)
