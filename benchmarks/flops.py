"""FLOP counting and the matmul ceiling shared by the GPU benchmarks (gpu_denoiser.py, gpu_stream.py).

`count_flops(module)` counts, while it is active:
- linear FLOPs with forward hooks: 2 * M * K * N per nn.Linear call (or any `linear_types`, e.g. an
  FP8 linear); `tag(module)` marks a subset counted again under `tagged` (the FP8-eligible linears);
- convolution FLOPs with forward hooks: 2 * output elements * (C_in / groups) * kernel volume per
  nn.Conv1d/2d/3d call (a causal Conv3d subclass included);
- dense attention FLOPs: every `F.scaled_dot_product_attention` call, patched for the duration,
  counts QK^T and AV over all keys, masked keys included, as the kernels compute them:
  2 * Lq * Lk * (E + Ev) per batch-head. It also counts the calls that passed an attn_mask, which
  tells whether attention could run on the mask-free (flash / cuDNN) kernels.
Elementwise work, norms and functional convolutions outside modules are not counted (well under 1 % of
every flowact network). Hooks only read shapes, so counting works on the meta device: no weights,
no memory, no time.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class FlopCount:
    linear: int = 0
    conv: int = 0
    attention: int = 0
    tagged: int = 0  # linears selected by `tag` (a subset of `linear`)
    sdpa_calls: int = 0
    sdpa_masked: int = 0  # attention calls that passed an explicit attn_mask
    by_module: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.linear + self.conv + self.attention

    def as_dict(self) -> dict:
        return {"total": self.total, "linear": self.linear, "conv": self.conv, "attention": self.attention,
                "sdpa_calls": self.sdpa_calls, "sdpa_masked": self.sdpa_masked}


def attention_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Dense QK^T + AV FLOPs of one SDPA call: q (..., Lq, E), k (..., Lk, E), v (..., Lk, Ev)."""
    batch = math.prod(q.shape[:-2])
    lq, e, lk, ev = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    return 2 * batch * lq * lk * (e + ev)


@contextlib.contextmanager
def count_sdpa(count: FlopCount):
    """Patch F.scaled_dot_product_attention to add its dense FLOPs (and mask use) to `count`."""
    original = F.scaled_dot_product_attention

    def counting(query, key, value, attn_mask=None, *args, **kwargs):
        count.attention += attention_flops(query, key, value)
        count.sdpa_calls += 1
        count.sdpa_masked += attn_mask is not None
        return original(query, key, value, attn_mask, *args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        yield count
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def count_flops(modules: nn.Module | Iterable[nn.Module], linear_types: tuple[type, ...] = (nn.Linear,),
                tag: Callable[[nn.Module], bool] | None = None, count: FlopCount | None = None):
    """Count the FLOPs of everything the modules run while the context is active -> FlopCount."""
    count = FlopCount() if count is None else count
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)

    def linear_hook(mod, inputs, output):
        x = inputs[0]
        n_in = x.shape[-1]
        flops = 2 * (x.numel() // n_in) * n_in * mod.out_features
        count.linear += flops
        if tag is not None and tag(mod):
            count.tagged += flops

    def conv_hook(mod, inputs, output):
        count.conv += 2 * output.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)

    handles = []
    for root in roots:
        for m in root.modules():
            if isinstance(m, linear_types):
                handles.append(m.register_forward_hook(linear_hook))
            elif isinstance(m, CONV_TYPES):
                handles.append(m.register_forward_hook(conv_hook))
    try:
        with count_sdpa(count):
            yield count
    finally:
        for h in handles:
            h.remove()


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, warmup: int = 3, iters: int = 10) -> dict:
    """The device's achieved dense matmul rate on random data (n x n x n; CUDA events on a GPU)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(warmup):
        a @ b
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3 / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        seconds = (time.perf_counter() - t0) / iters
    del a, b
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "iters": iters, "ms": round(seconds * 1e3, 3),
            "tflops": float(f"{2 * n**3 / seconds / 1e12:.4g}")}
