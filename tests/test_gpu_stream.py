"""benchmarks/gpu_stream.py (the GPU whole-chunk benchmark) smoke-tested on CPU, and its FLOP counter."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowact.benchmarks import gpu_point, gpu_probes, gpu_stream, gpu_tables, kit
from flowact.benchmarks.flops import count_flops
from flowact.runtime import RuntimeKind, build_runners

FAST = ["--warmup", "1", "--serial", "1", "--chunks", "3", "--ttff-reps", "1", "--no-profile"]


def test_count_flops_linear_conv_attention():
    lin, conv = nn.Linear(8, 4), nn.Conv2d(2, 3, 3, padding=1)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
    sdpa = F.scaled_dot_product_attention
    with count_flops([lin, conv]) as c:
        lin(torch.randn(3, 8))
        conv(torch.randn(1, 2, 5, 5))
        F.scaled_dot_product_attention(q, k, k)
        F.scaled_dot_product_attention(q, k, k, attn_mask=torch.ones(4, 6, dtype=torch.bool))
    assert c.linear == 2 * 3 * 8 * 4
    assert c.conv == 2 * (3 * 5 * 5) * 2 * 9
    assert c.attention == 2 * (2 * 2 * 4 * 6 * (8 + 8))  # dense QK^T + AV, masked keys included
    assert (c.sdpa_calls, c.sdpa_masked) == (2, 1)
    assert F.scaled_dot_product_attention is sdpa  # restored


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_stream") / "tiny.json"
    rc = gpu_stream.main(["--device", "cpu", "--preset", "tiny", "--streams", "1,2", "--matmul-n", "128",
                          *FAST, "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_smoke_run_on_cpu_reports_every_field(smoke):
    r = smoke
    assert r["preset"] == "tiny" and r["runtime"] == "torch" and r["dtype"] == "float32"
    assert r["matmul"]["tflops"] > 0 and r["flops_error"] is None and r["partial"] is False
    assert [p["streams"] for p in r["points"]] == [1, 2]
    for p in r["points"]:
        assert p["status"] == "ok", p
        for key in ("chunk_ms", "period_ms", "serial_chunk_ms", "ttff_ms"):
            assert p[key]["p50"] > 0 and p[key]["p99"] >= p[key]["p50"], (key, p[key])
        assert p["chunk_ms"]["n"] == 3 and p["realtime"] == (p["chunk_ms"]["p99"] < 480.0)
        assert p["chunk_ms_plain"]["n"] + p["chunk_ms_refining"]["n"] == 3
        assert p["ttff_parts_ms"]["vae_encoder"] > 0
        assert p["memory"] is None  # CPU: no device allocator to read
        for parts in (p["parts"], p["parts_serial"]):
            assert set(parts) == set(gpu_probes.PARTS)
            for part, s in parts.items():
                assert s["ms_per_call_p50"] > 0 and s["tflop_per_call"] > 0 and s["tflops"] > 0, (part, s)
        # memory refinement every 4 chunks: the memory pass runs once per chunk, or twice
        assert p["parts_serial"]["audio_encoder"]["calls_per_chunk"] == 1
        assert p["parts"]["denoiser"]["calls_per_chunk"] >= 3
        # the decoder of chunk k ran while chunk k+1 was denoised
        ov = p["overlap"]
        assert ov["mode"] == "worker thread" and ov["overlapped_pairs"] >= 1 and ov["hidden_ms"] > 0
        # today every denoiser call passes a mask; the report says so
        assert p["attention"]["denoiser"]["sdpa_calls"] > 0
        assert p["mask_free"] is (p["attention"]["denoiser"]["sdpa_masked"] == 0)
    rt = [p["streams"] for p in r["points"] if p["realtime"]]
    assert r["realtime_streams"] == (max(rt) if rt else 0)
    f = r["flops_per_stream"]
    assert f["denoiser"]["attention"] > 0 and f["denoiser"]["linear"] > 0 and f["vae_decoder"]["conv"] > 0
    # batching: two streams' calls do twice the FLOPs of one stream's (parts every stream runs once per
    # chunk; staggered refinement runs denoiser calls on one of the two streams)
    for part in ("audio_encoder", "vae_decoder"):
        one, two = r["points"][0]["parts_serial"][part], r["points"][1]["parts_serial"][part]
        assert two["tflop_per_call"] == pytest.approx(2 * one["tflop_per_call"], rel=1e-3), part
    assert r["plan"]["staggered"] is True


def test_an_out_of_memory_n_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    run_point = gpu_stream.run_point

    def oom_at_two(n, ctx, first):
        if n == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return run_point(n, ctx, first)

    monkeypatch.setattr(gpu_stream, "run_point", oom_at_two)
    out = tmp_path / "oom.json"
    assert gpu_stream.main(["--device", "cpu", "--preset", "tiny", "--streams", "2,1", "--matmul-n", "128",
                            *FAST, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [(p["streams"], p["status"]) for p in r["points"]] == [(2, "oom"), (1, "ok")]
    assert "80.00 GiB" in r["points"][0]["error"] and "CUDA OUT OF MEMORY" in capsys.readouterr().out
    assert "**oom**" in gpu_tables.points_table(r)


def test_readme_table_is_generated_from_the_results(smoke, tmp_path):
    block = gpu_tables.render_readme_block([smoke])
    assert block.startswith(gpu_tables.BEGIN) and block.endswith(gpu_tables.END)
    assert "| 1 |" in block and "| 2 |" in block and "denoiser (one NFE)" in block
    # publishing rewrites only the generated block
    readme = tmp_path / "README.md"
    readme.write_text(f"# B\n\nbefore\n\n{gpu_tables.BEGIN}\nstale\n{gpu_tables.END}\n\nafter\n")
    results = tmp_path / "results"
    results.mkdir()
    (results / "gpu_stream_tiny.json").write_text(json.dumps(smoke))
    gpu_tables.update_readme(readme, results)
    text = readme.read_text()
    assert "stale" not in text and "before" in text and "after" in text and block in text


def test_shipped_readme_matches_shipped_results(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copyfile(gpu_tables.README, readme)
    gpu_tables.update_readme(readme, gpu_tables.RESULTS)
    assert readme.read_text() == gpu_tables.README.read_text(), \
        "benchmarks/README.md is stale: run `python -m flowact.benchmarks.gpu_stream --readme`"


def test_inputs_without_pyav_or_soundfile_match_flowact_media(monkeypatch):
    """The GPU machine has neither PyAV nor soundfile: the stdlib/PIL reader gives the same arrays."""
    import sys

    import numpy as np

    from flowact.presets import get_preset

    tiny = get_preset("tiny")
    image, speech, how = kit.reference_inputs(tiny)
    assert how == "flowact.media"
    monkeypatch.setitem(sys.modules, "av", None)
    monkeypatch.setitem(sys.modules, "soundfile", None)
    monkeypatch.delitem(sys.modules, "flowact.media")
    image2, speech2, how2 = kit.reference_inputs(tiny)
    assert how2 == "wave+PIL" and np.array_equal(image, image2) and np.array_equal(speech, speech2)


def test_trt_engine_needs_a_gpu_and_plans(capsys):
    assert gpu_stream.main(["--runtime", "trt", "--device", "cpu", "--preset", "tiny"]) == gpu_stream.EXIT_UNAVAILABLE
    assert "--runtime trt needs" in capsys.readouterr().err


@pytest.mark.skipif(gpu_stream.tensorrt_missing() is None, reason="TensorRT is installed")
def test_trt_engine_without_tensorrt_exits_2(tmp_path, capsys):
    argv = ["--runtime", "trt", "--source", str(tmp_path), "--preset", "tiny", "--streams", "1"]
    assert gpu_stream.main(argv) == gpu_stream.EXIT_UNAVAILABLE
    assert "TensorRT is not installed" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_exits_2(capsys):
    assert gpu_stream.main(["--preset", "tiny", "--streams", "1"]) == gpu_stream.EXIT_UNAVAILABLE
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_cuda_pass(tmp_path):
    out = tmp_path / "cuda.json"
    assert gpu_stream.main(["--device", "cuda", "--preset", "tiny", "--streams", "1,2", "--matmul-n", "2048",
                            *FAST[:-1], "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["dtype"] == "bfloat16" and r["device"]["type"] == "cuda"
    for p in r["points"]:
        assert p["status"] == "ok" and p["chunk_ms"]["p50"] > 0
        assert p["overlap"]["mode"].startswith("cuda side stream") and p["overlap"]["overlapped_pairs"] >= 1
        assert p["memory"]["per_stream_peak_gib"] > 0
        assert set(p["parts"]) == set(gpu_probes.PARTS)
    assert isinstance(r["points"][0].get("attention_kernels"), dict)


def test_streams_are_staggered_over_the_refinement_period():
    """Stream i runs i mod K chunks ahead, so at most ceil(N/K) streams refine in one chunk."""
    from flowact.presets import get_preset

    preset = get_preset("tiny")
    device = torch.device("cpu")
    runners = build_runners(RuntimeKind.TORCH, preset, device=device)
    image, speech, _ = kit.reference_inputs(preset)
    ctx = gpu_point.Context(preset, device, torch.float32, runners, gpu_probes.Recorder(), image,
                            kit.whole_chunks(speech), None, "torch")
    point = gpu_point.Point(6, ctx)
    point.start()
    point.denoise()
    point.stagger()
    k = preset.refine_every
    assert [s.chunk_index for s in point.states] == [1 + i % k for i in range(6)]
    for _ in range(2 * k):
        assert sum(s.refinement_due() for s in point.states) <= -(-6 // k)
        point.denoise()


def test_timing_probes_wrap_the_networks_only(tiny):
    """The probes wrap the six network callables; `memory_subsets` stays the runners' own flag (a TensorRT
    runner set's False must not turn into a truthy probe)."""
    import dataclasses

    from flowact.networks import build_networks
    from flowact.runtime import Runners

    runners = dataclasses.replace(Runners.from_networks(build_networks(tiny)), memory_subsets=False)
    timed = gpu_probes.timed_runners(runners, runners, gpu_probes.Recorder())
    assert timed.memory_subsets is False and isinstance(timed.denoiser, gpu_probes.Timed)
