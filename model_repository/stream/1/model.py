"""Triton `stream` model: the stateful heart of the ensemble (python backend, sequence batching).

This file only adapts: it turns Triton requests into engine calls and answers every request.
Sessions, admission, drain and eviction live in flowact.serving.streams; the chunk maths in
flowact.engine; the networks run in the engine models, reached through BLS.

Per request: AUDIO (7,680 float32 samples) and an optional PROMPT; with START also REF_IMAGE and
an optional SEED. The requests of many streams arriving in one execute() run as one batch per
network call. Output: LATENTS ([context | chunk], decoded by the next ensemble step so decoding of
chunk n overlaps denoising of chunk n+1), or FRAMES when the repository is rendered `serial`.
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

from flowact.engine import InputError, StreamSession, check_audio_chunk, check_prompt, denoise_batch
from flowact.presets import get_preset
from flowact.serving.bls import bls_engines
from flowact.serving.server import DEFAULT_DRAIN_FILE, DRAIN_FILE_ENV
from flowact.serving.streams import StreamRegistry

METRICS = {  # name -> (kind, help); names are the chart's contract (helm/flowact)
    "flowact_active_streams": ("GAUGE", "streams with state on this server"),
    "flowact_stream_capacity": ("GAUGE", "streams this server admits"),
    "flowact_draining": ("GAUGE", "1 while the server refuses new streams"),
    "flowact_chunks_total": ("COUNTER", "chunks generated"),
    "flowact_streams_rejected_total": ("COUNTER", "STARTs refused (capacity, draining)"),
    "flowact_streams_evicted_total": ("COUNTER", "streams freed by the idle TTL"),
    "flowact_chunk_latency_seconds_sum": ("COUNTER", "seconds spent generating chunks (stream model)"),
    "flowact_chunk_latency_seconds_count": ("COUNTER", "chunks timed"),
    "flowact_ttff_seconds_sum": ("COUNTER", "seconds from START to its first chunk (stream model)"),
    "flowact_ttff_seconds_count": ("COUNTER", "streams timed"),
}


def parameter(config: dict, key: str) -> str:
    try:
        return config["parameters"][key]["string_value"]
    except KeyError:
        raise pb_utils.TritonModelException(f"stream model config lacks parameter {key!r}") from None


def optional_input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def one(array: np.ndarray, name: str) -> np.ndarray:
    """Strip the batch dim of a single-chunk request."""
    if array.shape[0] != 1:
        raise InputError(f"{name}: one chunk per request, got a batch of {array.shape[0]}")
    return array[0]


def text_input(request, name: str) -> str | None:
    array = optional_input(request, name)
    if array is None:
        return None
    raw = one(array, name).reshape(-1)
    if raw.size != 1:
        raise InputError(f"{name}: expected one string, got {raw.size}")
    value = raw[0]
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise InputError(f"{name}: not valid UTF-8") from None
    return check_prompt(text, name)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.preset = get_preset(parameter(config, "preset"))
        self.output_name = parameter(config, "output")  # LATENTS (pipelined) or FRAMES (serial)
        capacity = int(parameter(config, "capacity"))
        engines = bls_engines(self.preset)
        self.engines = engines
        torch.set_num_threads(1)  # the engine models do the heavy lifting
        self.registry = StreamRegistry(
            capacity=capacity, idle_ttl_s=float(parameter(config, "idle_ttl_s")),
            new_session=lambda: StreamSession(self.preset, engines),
            drain_file=Path(os.environ.get(DRAIN_FILE_ENV, DEFAULT_DRAIN_FILE)))
        self.metric_families = {  # must outlive their Metric objects
            name: pb_utils.MetricFamily(name=name, description=help_text, kind=getattr(pb_utils.MetricFamily, kind))
            for name, (kind, help_text) in METRICS.items()}
        self.metrics = {name: family.Metric(labels={"model": "stream", "preset": self.preset.name})
                        for name, family in self.metric_families.items()}
        self.metrics["flowact_stream_capacity"].set(capacity)
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
        c = r.counters
        with self.metrics_lock:
            self.metrics["flowact_active_streams"].set(r.active())
            self.metrics["flowact_draining"].set(1 if r.draining() else 0)
            for name, value in (("flowact_chunks_total", c.chunks), ("flowact_streams_rejected_total", c.rejected),
                                ("flowact_streams_evicted_total", c.evicted),
                                ("flowact_chunk_latency_seconds_sum", c.chunk_seconds),
                                ("flowact_chunk_latency_seconds_count", c.chunks),
                                ("flowact_ttff_seconds_sum", c.ttff_seconds),
                                ("flowact_ttff_seconds_count", c.ttff_count)):
                delta = value - self.reported.get(name, 0)
                if delta:
                    self.metrics[name].increment(delta)
                    self.reported[name] = value

    def admit(self, request):
        """Validate one request and find (or start) its session -> (id, session, audio, prompt, end)."""
        sid = request.correlation_id()
        start = bool(one(optional_input(request, "START"), "START").reshape(-1)[0])
        end = bool(one(optional_input(request, "END"), "END").reshape(-1)[0])
        audio = check_audio_chunk(one(pb_utils.get_input_tensor_by_name(request, "AUDIO").as_numpy(), "AUDIO"), "AUDIO")
        prompt = text_input(request, "PROMPT")
        if start:
            image = optional_input(request, "REF_IMAGE")
            if image is None:
                raise InputError("REF_IMAGE: required with START (the stream's reference image)")
            seed_array = optional_input(request, "SEED")
            seed = 0 if seed_array is None else int(one(seed_array, "SEED").reshape(-1)[0])
            session = self.registry.start(sid, one(image, "REF_IMAGE"), seed, prompt or "speaking")
        else:
            session = self.registry.get(sid).session
        return sid, session, audio, prompt, end

    def execute(self, requests):
        t0 = time.monotonic()
        responses = [None] * len(requests)
        batch, ends = [], []
        for i, request in enumerate(requests):
            try:
                sid, session, audio, prompt, end = self.admit(request)
                batch.append((i, sid, session, audio, prompt))
            except Exception as e:  # every request gets an answer; InputError messages name the field
                message = str(e) if isinstance(e, InputError) else f"internal error in stream model: {e!r}"
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
                end = False
            if end:
                ends.append(request.correlation_id())
        if batch:
            try:
                out = self.generate([b[2] for b in batch], [b[3] for b in batch], [b[4] for b in batch])
                seconds = time.monotonic() - t0
                for j, (i, sid, _, _, _) in enumerate(batch):
                    index = np.array([[batch[j][2].chunk_index - 1]], dtype=np.int64)
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor(self.output_name, out[j:j + 1]), pb_utils.Tensor("CHUNK_INDEX", index)])
                    self.registry.chunk_done(sid, seconds)
            except Exception as e:  # an engine failed: these streams' state is unknown, free them
                for i, sid, _, _, _ in batch:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"chunk generation failed, stream {sid!r} ended: {e}"))
                    self.registry.end(sid)
        for sid in ends:
            self.registry.end(sid)
        self.publish_metrics()
        return responses

    def generate(self, sessions, audio, prompts) -> np.ndarray:
        latents = denoise_batch(sessions, audio, prompts)  # (B, 1+3, 16, h, w)
        if self.output_name == "FRAMES":  # serial pipeline: decode here, before answering
            return self.engines.vae_decoder(latents).numpy()  # (B, 12, H, W, 3) uint8
        return latents.numpy()

    def finalize(self):
        self.stop.set()
        self.reaper.join(timeout=10)
