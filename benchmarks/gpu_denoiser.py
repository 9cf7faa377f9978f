"""Time the denoiser per NFE on one GPU: bf16 vs FP8 matmuls (torch._scaled_mm), with TFLOP/s.

    python benchmarks/gpu_denoiser.py --preset r1-480p --batch 1 --warmup 3 --iters 10 --out gpu_denoiser.json

Needs only torch (CUDA) and the flowact package (`pip install --no-deps -e .` in the repository; no
network, no onnx, no TensorRT). Seeded random weights of the preset, built directly on the GPU.

What is timed (CUDA events, median over --iters after --warmup):
- `memory_kv`: keys/values of the memory bank (reference + long-term + short-term slots), once per chunk;
- `forward_stream`: one NFE of the chunk being denoised against the cached memory keys/values;
- a chunk = memory_kv + nfe x forward_stream, against the 480 ms of video it produces.
Precisions: `bf16` (weights and activations bf16 under autocast) and `fp8`: the transformer blocks'
qkv / proj / MLP linears replaced by an FP8 (e4m3) linear on torch._scaled_mm with per-tensor
scales (weights: amax of the weight; activations: static amax calibrated on one bf16 pass, as the
TensorRT engines use); modulation, embeddings, final projection, norms and attention stay bf16,
the same policy as the FP8 ONNX export. TFLOP/s counts linear-layer FLOPs (measured by hooks)
plus dense attention FLOPs (QK^T and AV, masked keys included, as the kernels compute them), with
flowact.benchmarks.flops.count_flops (shared with gpu_stream.py, the whole-chunk benchmark).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from flowact.benchmarks.flops import count_flops
from flowact.models.mmdit import MMDiT
from flowact.presets import AUDIO_FEATURES_PER_CHUNK, CHUNK_SECONDS, LATENT_CHANNELS, LATENT_FRAMES_PER_CHUNK, get_preset

FP8_MAX = 448.0
# the FP8 policy of flowact.export.fp8 (kept here so this script needs torch only)
FP8_LAYERS = re.compile(r"blocks\.\d+\.(video|cond)\.(qkv|proj|mlp\.0|mlp\.2)$")


class FP8Linear(nn.Module):
    """y = x W^T + b with x and W in float8 e4m3 (per-tensor scales), bf16 output, via torch._scaled_mm."""

    def __init__(self, linear: nn.Linear, act_amax: float, fast_accum: bool):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        w_scale = w.abs().max().clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight", (w / w_scale).to(torch.float8_e4m3fn).contiguous())  # (out, in) row-major
        self.register_buffer("w_scale", w_scale.reshape(()).float())
        self.register_buffer("x_scale", torch.tensor(max(act_amax, 1e-12) / FP8_MAX, device=w.device))
        self.register_buffer("x_inv_scale", 1.0 / self.x_scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        self.out_features = linear.out_features
        self.fast_accum = fast_accum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1])  # (M, K)
            xq = (x2.float() * self.x_inv_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=self.x_scale, scale_b=self.w_scale, bias=self.bias,
                                 out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)  # (M, N)
        return y.reshape(*shape[:-1], self.out_features)


def build_inputs(p, batch: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    lat = (p.latent_height, p.latent_width)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    x = randn(batch, LATENT_FRAMES_PER_CHUNK, LATENT_CHANNELS, *lat)
    t = torch.full((batch, LATENT_FRAMES_PER_CHUNK), 0.8, device=device, dtype=dtype)
    audio = randn(batch, AUDIO_FEATURES_PER_CHUNK, p.audio.d_model)
    prompt = randn(batch, p.prompt_tokens, p.text_dim)
    memory = randn(batch, p.memory_frames, LATENT_CHANNELS, *lat)
    valid = torch.ones(batch, p.memory_frames, dtype=torch.bool, device=device)  # a stream in steady state
    return x, t, audio, prompt, memory, valid


LINEAR_TYPES = (nn.Linear, FP8Linear)


def is_fp8_candidate(module: nn.Module) -> bool:
    return getattr(module, "_fp8_candidate", False)


def calibrate(model: nn.Module, names: list[str], run) -> dict[str, float]:
    """Static activation amax of each named linear's input over one call of `run`."""
    amax: dict[str, float] = {}
    modules = dict(model.named_modules())

    def make(name):
        def hook(mod, inputs):
            amax[name] = max(amax.get(name, 0.0), float(inputs[0].detach().abs().max()))
        return hook

    handles = [modules[n].register_forward_pre_hook(make(n)) for n in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return amax


def swap_to_fp8(model: nn.Module, amax: dict[str, float], fast_accum: bool) -> int:
    modules = dict(model.named_modules())
    for name, a in amax.items():
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        fp8 = FP8Linear(modules[name], a, fast_accum)
        fp8._fp8_candidate = True
        setattr(parent, child, fp8)
    return len(amax)


def timed(fn, warmup: int, iters: int, device) -> list[float]:
    """Milliseconds per call (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(label, model, inputs, args, device) -> tuple[dict, torch.Tensor]:
    x, t, audio, prompt, memory, valid = inputs
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    with torch.inference_mode(), autocast:
        kv = model.memory_kv(memory, valid).to(torch.bfloat16)  # the engine keeps the memory cache in bf16
        stream = (lambda: model.forward_stream(x, t, audio, prompt, kv, valid))
        memory_fn = (lambda: model.memory_kv(memory, valid))
        with count_flops(model, LINEAR_TYPES, is_fp8_candidate) as counts_mem:  # eager, before any compilation
            memory_fn()
        with count_flops(model, LINEAR_TYPES, is_fp8_candidate) as counts_nfe:
            v = stream()
        if args.compile:
            stream, memory_fn = torch.compile(stream), torch.compile(memory_fn)
        t_mem = timed(memory_fn, args.warmup, args.iters, device)
        t_nfe = timed(stream, args.warmup, args.iters, device)
    nfe_ms, mem_ms = statistics.median(t_nfe), statistics.median(t_mem)
    nfe_flops, mem_flops = counts_nfe.total, counts_mem.total
    chunk_ms = mem_ms + args.nfe * nfe_ms
    result = {
        "nfe_ms": round(nfe_ms, 3), "nfe_ms_min": round(min(t_nfe), 3),
        "memory_kv_ms": round(mem_ms, 3), "chunk_ms": round(chunk_ms, 3),
        "realtime_factor": round(chunk_ms / (CHUNK_SECONDS * 1e3), 4),
        "nfe_linear_tflop": round(counts_nfe.linear / 1e12, 6),
        "nfe_linear_tflop_fp8_eligible": round(counts_nfe.tagged / 1e12, 6),
        "nfe_attention_tflop": round(counts_nfe.attention / 1e12, 6),
        "memory_kv_tflop": round(mem_flops / 1e12, 6),
        "nfe_tflops_per_s": round(nfe_flops / (nfe_ms * 1e-3) / 1e12, 4),
        "memory_kv_tflops_per_s": round(mem_flops / (mem_ms * 1e-3) / 1e12, 4),
    }
    print(f"{label:>5}: NFE {nfe_ms:8.2f} ms ({result['nfe_tflops_per_s']:7.1f} TFLOP/s) | memory_kv {mem_ms:8.2f} ms "
          f"({result['memory_kv_tflops_per_s']:7.1f} TFLOP/s) | chunk ({args.nfe} NFE) {chunk_ms:8.2f} ms, "
          f"{result['realtime_factor']:.3f} x real time", flush=True)
    return result, v.float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="r1-480p")
    ap.add_argument("--batch", type=int, default=1, help="streams per call")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test on a small preset")
    ap.add_argument("--fast-accum", action="store_true", help="torch._scaled_mm use_fast_accum (Hopper)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the timed calls")
    ap.add_argument("--skip-fp8", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --device cpu with a small preset for a smoke test",
              file=sys.stderr)
        return 2
    p = get_preset(args.preset)
    args.nfe = p.nfe
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
        cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name, cc = platform.processor() or "cpu", None
    print(f"{p.name} denoiser (dim {p.dim}, depth {p.depth}, {p.tokens_per_frame} tokens/frame, "
          f"{p.memory_frames} memory frames), batch {args.batch}, on {name}, torch {torch.__version__}", flush=True)

    t0 = time.perf_counter()
    with torch.device(device):
        model = MMDiT(p)  # initialised where it runs: a 480p model never touches host memory
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    params = sum(t.numel() for t in model.parameters())
    print(f"built {params / 1e9:.2f} B parameters in {time.perf_counter() - t0:.1f} s", flush=True)
    inputs = build_inputs(p, args.batch, device, torch.bfloat16)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m._fp8_candidate = bool(FP8_LAYERS.search(n))

    results = {"preset": p.name, "batch": args.batch, "device": name, "compute_capability": cc,
               "torch": torch.__version__, "cuda": torch.version.cuda, "parameters": params, "nfe": p.nfe,
               "warmup": args.warmup, "iters": args.iters, "compile": args.compile, "fast_accum": args.fast_accum}
    results["bf16"], v_bf16 = measure("bf16", model, inputs, args, device)

    if not args.skip_fp8:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and FP8_LAYERS.search(n)]
        x, t, audio, prompt, memory, valid = inputs
        with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            kv = model.memory_kv(memory, valid).to(torch.bfloat16)
            amax = calibrate(model, names, lambda: (model.memory_kv(memory, valid),
                                                   model.forward_stream(x, t, audio, prompt, kv, valid)))
        results["fp8_layers"] = swap_to_fp8(model, amax, args.fast_accum)
        results["fp8"], v_fp8 = measure("fp8", model, inputs, args, device)
        rel = float((v_fp8 - v_bf16).norm() / v_bf16.norm().clamp(min=1e-30))
        results["fp8_vs_bf16_rel_l2"] = round(rel, 5)
        results["fp8_speedup_nfe"] = round(results["bf16"]["nfe_ms"] / results["fp8"]["nfe_ms"], 3)
        print(f"FP8: {results['fp8_layers']} linears, NFE speed-up {results['fp8_speedup_nfe']:.2f}x, "
              f"velocity rel. L2 vs bf16 {rel:.4f}", flush=True)
    if device.type == "cuda":
        results["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
