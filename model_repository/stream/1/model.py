"""Triton `stream` model: the stateful heart of the ensemble (python backend, sequence batching).

This file only adapts: it turns Triton requests into engine calls and answers every request.
Validation, streams by id, admission, drain and eviction live in flowact.serving.streams; the chunk
maths in flowact.engine and the per-stream state in flowact.state. The networks but the decoder run
here, beside the state, by the parameter `runtime`:
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

A hang-up (END without AUDIO) ends its stream and is answered with an error (contract.HUNG_UP).
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

from flowact.contract import (ACTIVE_STREAMS, CHUNK_INDEX, DRAIN_FILE_ENV, DRAINING, END, FRAMES, HUNG_UP, METRICS,
                              REQUIRE_RANDOM_IDS_ENV, RESUME, SNAPSHOT, SNAPSHOT_KEY_ENV, START, STREAM_CAPACITY,
                              WANT_SNAPSHOT)
from flowact.presets import get_preset
from flowact.engine import StreamEngine
from flowact.runtime import build_runners
from flowact.runtime.pytorch import cuda_context_lost, use_device
from flowact.serving.repository import stream_inputs
from flowact.serving.streams import STOPPING, ResumeRequest, StartRequest, StreamRegistry, parse_request, scalar
from flowact.serving.triton_tensors import output_tensor
from flowact.snapshot import SnapshotCodec, key_from_env, max_snapshot_bytes, padded
from flowact.state import StateCapacityError
from flowact.validate import InputError

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
        try:
            key = key_from_env()
        except ValueError as e:
            raise pb_utils.TritonModelException(str(e)) from None
        threads = int(parameter(config, "threads"))
        torch.set_num_threads(threads)
        runners = build_runners(runtime, self.preset, parameter(config, "source") or None, str(device), threads=threads)
        try:
            self.engine = StreamEngine(self.preset, runners, device, capacity=capacity, check_fits=True)
        except StateCapacityError as e:
            raise pb_utils.TritonModelException(f"stream model: {e}") from None
        print(f"flowact stream model: {capacity} stream slots on {device} ({runtime}), "
              f"{self.engine.pool.describe_stream()}", flush=True)
        self.codec = None if key is None else SnapshotCodec(self.preset, key, RESUME, device.type,  # None: snapshots off
                                                               runners.quantized)
        self.max_snapshot_bytes = max_snapshot_bytes(self.preset, device.type)
        self.input_names = [i.name for i in stream_inputs(self.preset)]
        self.engine.warm_up()
        self.registry = StreamRegistry(
            capacity=capacity, idle_ttl_s=float(parameter(config, "idle_ttl_s")), release=self.engine.end,
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

    def reap_idle(self):
        period = max(0.2, min(5.0, self.registry.idle_ttl_s / 4))
        while not self.stop.wait(period):
            if self.registry.evict_idle():
                self.publish_metrics()

    def publish_metrics(self):
        r = self.registry
        with self.metrics_lock:
            self.metrics[ACTIVE_STREAMS].set(r.active())
            self.metrics[DRAINING].set(1 if r.draining() else 0)
            for name, value in r.counters.metric_values().items():
                delta = value - self.reported.get(name, 0)
                if delta:
                    self.metrics[name].increment(delta)
                    self.reported[name] = value

    def admit(self, request, start: bool, end: bool):
        """Validate one request and find (or start, or resume) its stream -> (id, StreamState, ChunkRequest),
        or None for a hang-up (its END frees the stream)."""
        sid = request.correlation_id()
        req = parse_request({name: optional_input(request, name) for name in self.input_names}, start, end, self.preset,
                            self.max_snapshot_bytes)
        if req is None:
            return None
        resume = isinstance(req.begin, ResumeRequest)
        if self.codec is None and (req.want_snapshot or resume):
            raise InputError(f"{RESUME if resume else WANT_SNAPSHOT}: snapshots are disabled on this server "
                             f"(it has no {SNAPSHOT_KEY_ENV})")
        begin = req.begin
        if isinstance(begin, StartRequest):
            state = self.registry.admit(sid, lambda: self.engine.start(begin.image, begin.seed, begin.prompt))
        elif isinstance(begin, ResumeRequest):  # the snapshot replaces REF_IMAGE and SEED
            state = self.registry.admit(sid, lambda: self.codec.restore(self.engine, begin.snapshot), resumed=True)
        else:
            state = self.registry.get(sid).state
        return sid, state, req

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
                admitted = self.admit(request, start, end)
            except Exception as e:  # every request gets an answer; InputError messages name the field
                self.registry.refused(e)
                message = str(e) if isinstance(e, InputError) else f"internal error in stream model: {e!r}"
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
                continue
            if admitted is None:  # a hang-up: its END (above) frees the stream
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"stream {request.correlation_id()!r}: {HUNG_UP}"))
            else:
                batch.append((i, *admitted))
        if batch:
            try:
                out = self.generate([b[2] for b in batch], [b[3].audio for b in batch], [b[3].prompt for b in batch])
                seconds = time.monotonic() - t0
                for j, (i, sid, state, req) in enumerate(batch):
                    index = np.array([[state.chunk_index - 1]], dtype=np.int64)
                    snapshot = (np.frombuffer(padded(self.codec.encode(state), self.max_snapshot_bytes),
                                              dtype=np.uint8)[None] if req.want_snapshot else NO_SNAPSHOT)
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        output_tensor(self.output_name, out[j:j + 1]), pb_utils.Tensor(CHUNK_INDEX, index),
                        pb_utils.Tensor(SNAPSHOT, snapshot)])
                    self.registry.chunk_done(sid, seconds)
            except Exception as e:  # an engine failed: these streams' state is unknown, free them
                lost = cuda_context_lost(self.engine.device)
                cause = (f"{STOPPING}, resume on another replica ({e})"
                         if self.registry.stopping() or lost else str(e))
                if lost:  # every later call would fail too: answer, then exit so the launcher stops the replica
                    print(f"flowact stream model: the CUDA context of {self.engine.device} is lost ({e}); exiting", flush=True)
                    threading.Timer(CONTEXT_LOST_EXIT_S, os._exit, (1,)).start()
                for i, sid, _, _ in batch:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"chunk generation failed, stream {sid!r} ended: {cause}"))
                    self.registry.end(sid)
        for sid in ends:
            self.registry.end(sid)
        self.publish_metrics()
        return responses

    def generate(self, states, audio, prompts) -> torch.Tensor:
        latents = self.engine.denoise(states, audio, prompts)  # (B, 1+3, 16, h, w) on the state's device
        if self.output_name == FRAMES:  # serial pipeline: decode here, before answering
            return self.engine.decode(latents)  # (B, 12, H, W, 3) uint8
        return latents.float()  # the decoder model's input dtype

    def finalize(self):
        self.stop.set()
        self.reaper.join(timeout=10)
