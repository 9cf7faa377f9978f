"""The timing probes of gpu_stream.py: each network call's start and end marks (CUDA events on a GPU, the
host clock elsewhere) and input shapes, the FLOPs of those shapes replayed on meta-device networks, and
the attention kernels the profiler sees."""

from __future__ import annotations

import dataclasses
import threading
import time

import torch

from flowact.benchmarks.flops import FlopCount, count_flops, count_sdpa
from flowact.networks import build_networks
from flowact.runtime import Runners
from flowact.specs import NETWORK_NAMES

PARTS = ("audio_encoder", "denoiser_memory", "denoiser", "vae_decoder")  # every chunk
START_PARTS = ("vae_encoder", "text_encoder")  # START (the text encoder: once per new prompt)


def meta_runners(preset):
    """The same networks on the meta device (shapes only): what count_flops replays each call on."""
    nets = build_networks(preset, device="meta")  # no host memory: 3.3 B fp32 parameters would be 13 GB
    return Runners.from_networks(nets), nets.modules()


@dataclasses.dataclass
class Call:
    part: str
    phase: str
    chunk: int
    start: object  # a CUDA event or a perf_counter reading
    end: object
    signature: tuple


class Clock:
    """Marks on the calling thread's current CUDA stream (events) or the host clock; ms since origin."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
        self.origin = self.mark()

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def ms(self, mark) -> float:
        """Milliseconds from the origin to `mark` (CUDA: only after the device has passed it)."""
        return self.origin.elapsed_time(mark) if self.cuda else (mark - self.origin) * 1e3


class Recorder:
    """Shared by the timing probes: the current clock, each call, and the phase each thread is in."""

    def __init__(self):
        self.clock: Clock | None = None
        self.calls: list[Call] = []
        self.local = threading.local()
        self.use_eager = False  # the probe chunk runs the eager callables (counting SDPA masks)
        self.sdpa: dict[str, FlopCount] | None = None

    def tag(self, phase: str, chunk: int) -> None:
        self.local.phase, self.local.chunk = phase, chunk


def signature(args, kwargs) -> tuple:
    def one(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", tuple(a.shape), str(a.dtype))
        return ("value", None if a is None else repr(a))
    return tuple(one(a) for a in args) + tuple(("kw", k, one(v)) for k, v in sorted(kwargs.items()))


class Timed:
    """One runner callable with its calls recorded (start/end marks, shapes)."""

    def __init__(self, part: str, fn, eager, rec: Recorder):
        self.part, self.fn, self.eager, self.rec = part, fn, eager, rec

    def __call__(self, *args, **kwargs):
        rec = self.rec
        fn = self.eager if rec.use_eager else self.fn
        start = rec.clock.mark()
        if rec.sdpa is not None:
            with count_sdpa(rec.sdpa.setdefault(self.part, FlopCount())):
                out = fn(*args, **kwargs)
        else:
            out = fn(*args, **kwargs)
        end = rec.clock.mark()
        rec.calls.append(Call(self.part, getattr(rec.local, "phase", "?"), getattr(rec.local, "chunk", -1),
                              start, end, signature(args, kwargs)))
        return out


def timed_runners(runners, eager, rec: Recorder):
    return dataclasses.replace(runners, **{n: Timed(n, getattr(runners, n), getattr(eager, n), rec) for n in NETWORK_NAMES})


def flops_of(signatures: set, meta, modules) -> tuple[dict, str | None]:
    """FLOPs of each (part, signature) call, replayed on the meta-device networks."""
    out = {}
    try:
        for part, sig in sorted(signatures, key=lambda ps: ((PARTS + START_PARTS).index(ps[0]), repr(ps[1]))):
            def make(entry):
                return torch.empty(entry[1], dtype=_meta_dtype(entry[2]), device="meta") if entry[0] == "tensor" else None

            args = [make(e) for e in sig if e[0] != "kw"]
            kwargs = {e[1]: make(e[2]) for e in sig if e[0] == "kw"}
            with torch.inference_mode(), count_flops(modules.values()) as c:
                getattr(meta, part)(*args, **kwargs)
            out[(part, sig)] = c
    except Exception as e:  # noqa: BLE001 - a model the meta device cannot trace: no FLOPs, the timings stand
        return out, f"{type(e).__name__}: {e}"
    return out, None


def _meta_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."))
    return torch.float32 if dtype.is_floating_point else dtype  # the meta networks are float32


def sigfig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits (FLOP counts span tiny on a CPU to r1-480p on a GPU)."""
    return float(f"{x:.{digits}g}")


def attention_kernels(run) -> dict | None:
    """CUDA kernels with attention in their name while `run()` runs: {name: {count, ms}}."""
    from torch.profiler import ProfilerActivity, profile

    keys = ("flash", "fmha", "attention", "sdpa", "attn", "efficient")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        name = evt.key
        if any(k in name.lower() for k in keys):
            t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
            out[name[:160]] = {"count": evt.count, "ms": round(t / 1e3, 3)}
    return out
