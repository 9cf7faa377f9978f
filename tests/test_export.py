"""Export on the tiny preset: specs, ONNX == PyTorch, FP8 graph structure and error bounds, a 20-chunk
stream through ONNX Runtime runners, the TensorRT parser check; TensorRT itself skips without a GPU.

The tiny networks are exported once per session (fp32 + fp8) into a temporary root."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import run_stream, speech_chunks
from flowact.runtime import Runners
from flowact.export import graph
from flowact.export.calibrate import record_streams
from flowact.export.fp8 import FP8_NETWORKS, POLICIES, linear_layers, module_path, network_error
from flowact.runtime.manifest import Manifest
from flowact.export.onnx import export_onnx
from flowact.runtime.onnx import OrtRunner, load_onnx_runners
from flowact.export.tensorrt import tensorrt_onnx
from flowact.export.trt_check import check_tensorrt_compat, errors
from flowact.specs import (MEMORY_VALID, NETWORK_NAMES, BatchProfile, TensorSpec, network_specs, numpy_dtype,
                           onnx_elem_type, torch_dtype, triton_dtype)
from flowact.stats import psnr_db

# FP8 error vs float32 measured on tiny (held-out stream recording), bound at about 2x the measurement:
# rel_l2: audio_encoder 0.016, denoiser_memory 0.071, denoiser 0.0021, vae_encoder (fp16) 0.0016;
# vae_decoder (fp16): PSNR 59 dB, max 2 levels.
REL_L2_BOUND = {"audio_encoder": 0.035, "denoiser_memory": 0.15, "denoiser": 0.005, "vae_encoder": 0.004}
DECODER_PSNR_BOUND, DECODER_MAX_BOUND = 50.0, 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks run as fast on one thread, and one thread does not thrash on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def export_root(tmp_path_factory, tiny, tiny_nets):
    from flowact.export.fp8 import export_fp8

    root = tmp_path_factory.mktemp("export")
    export_fp8(tiny, root, nets=tiny_nets, streams=2, chunks=5, say=lambda s: None)
    return root


@pytest.fixture(scope="session")
def ort_fp32(export_root, tiny):
    return load_onnx_runners(export_root, tiny, threads=1)


def report(name, got: torch.Tensor, ref: torch.Tensor) -> float:
    d = (got.double() - ref.double()).abs()
    print(f"{name}: max {d.max():.2e} mean {d.mean():.2e}")
    return float(d.max())


# --- specs ----------------------------------------------------------------------------------------


def test_specs_follow_engines_and_map_dtypes(tiny):
    specs = network_specs(tiny)
    fields = tuple(f.name for f in dataclasses.fields(Runners))
    assert tuple(specs) == NETWORK_NAMES == fields[: len(NETWORK_NAMES)]  # the runners' networks first, then their facts
    assert not set(fields[len(NETWORK_NAMES) :]) & set(NETWORK_NAMES)
    names = [t.name for s in specs.values() for t in s.inputs + s.outputs]
    assert "MEMORY_KV" in names and names.count("PROMPT_TOKENS") == 2  # shared names mean the same tensor
    for dtype, tri in [(np.float32, "TYPE_FP32"), (np.uint8, "TYPE_UINT8"), (np.bool_, "TYPE_BOOL"), (np.int64, "TYPE_INT64")]:
        assert triton_dtype(dtype) == tri and numpy_dtype(tri) == np.dtype(dtype)
        assert numpy_dtype(torch_dtype(dtype)) == np.dtype(dtype)
        assert onnx.helper.tensor_dtype_to_np_dtype(onnx_elem_type(dtype)) == np.dtype(dtype)
    kv = specs["denoiser"].inputs[4]
    assert kv.dims_without_batch == (tiny.depth, 2, tiny.heads, tiny.memory_frames * tiny.tokens_per_frame,
                                     tiny.dim // tiny.heads)
    assert specs["denoiser"].max_batch_size == 8
    with pytest.raises(ValueError):
        TensorSpec("X", np.float32, (3, "batch"))
    with pytest.raises(ValueError):
        BatchProfile(2, 1, 4)


# --- float32 ONNX ---------------------------------------------------------------------------------


def memory_valid(preset, batch: int, full: bool) -> torch.Tensor:
    v = torch.ones(batch, preset.memory_frames, dtype=torch.bool)
    if not full:  # a fresh stream: only the reference slot
        v[:, 1:] = False
    return v


WITH_MEMORY = ("denoiser_memory", "denoiser")
CASES = [(n, b, full) for n in NETWORK_NAMES for b in (1, 3) for full in ((False, True) if n in WITH_MEMORY else (None,))]


@pytest.mark.parametrize("name, batch, full_memory", CASES)
def test_onnx_runtime_matches_torch(tiny, tiny_nets, ort_fp32, name, batch, full_memory):
    """batch = streams in one call; short memory = a fresh stream (reference only), full = every slot."""
    spec = network_specs(tiny)[name]
    inputs = list(spec.sample_inputs(batch, seed=11))
    if MEMORY_VALID in spec.input_names:
        inputs[spec.input_names.index(MEMORY_VALID)] = memory_valid(tiny, batch, full_memory)
    with torch.no_grad():
        expected = spec.callable(tiny_nets)(*inputs)
    got = getattr(ort_fp32, name)(*inputs)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if expected.dtype == torch.uint8:  # rounding to 8 bits: a value on a .5 boundary may land one level away
        diff = (got.int() - expected.int()).abs()
        print(f"{name}: max {int(diff.max())} levels, {float((diff > 0).float().mean()):.1e} of pixels differ")
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    else:
        assert report(f"{name} batch {batch}", got, expected) < 1e-4


def test_stream_of_20_chunks_through_onnx_runtime_matches_torch(tiny, tiny_runners, ort_fp32):
    chunks = speech_chunks(20, seed=4)
    ref = run_stream(tiny, tiny_runners, 5, chunks)
    got = run_stream(tiny, ort_fp32, 5, chunks)
    diff = np.abs(ref.astype(int) - got.astype(int))
    per_chunk = diff.reshape(20, -1).max(axis=1)
    print(f"ORT fp32 vs torch: max per chunk {per_chunk.tolist()}, mean {diff.mean():.2e}")
    assert per_chunk.max() <= 2 and diff.mean() < 1e-3


def test_export_is_idempotent_and_manifest_records_files(export_root, tiny, tiny_nets):
    messages = []
    files = export_onnx(tiny, export_root, nets=tiny_nets, say=messages.append)
    assert len(messages) == len(NETWORK_NAMES) and all("up to date, skipping" in m for m in messages)
    manifest = Manifest.load(export_root / "fp32")
    assert manifest.preset == "tiny" and manifest.precision == "fp32"
    for name, spec in network_specs(tiny).items():
        entry = manifest.networks[name]
        assert graph.model_hash(files[name]) == entry["sha256"]
        assert [t["name"] for t in entry["inputs"]] == spec.input_names
        assert entry["inputs"][0]["dims"][0] == "batch" and entry["batch"] == dataclasses.asdict(spec.profile)
    # a deleted file is re-exported, and only that one
    files["text_encoder"].unlink()
    messages.clear()
    export_onnx(tiny, export_root, nets=tiny_nets, say=messages.append)
    assert [m.split(":")[0] for m in messages if "skipping" not in m] == ["text_encoder"]
    assert graph.model_hash(files["text_encoder"]) == manifest.networks["text_encoder"]["sha256"]  # deterministic


def test_onnx_engine_contract(tiny, ort_fp32, export_root):
    spec = network_specs(tiny)["audio_encoder"]
    (window,) = spec.sample_inputs(2)
    assert ort_fp32.audio_encoder(window.bfloat16()).dtype == torch.bfloat16  # float outputs follow the caller
    with pytest.raises(TypeError, match="takes 1 inputs"):
        ort_fp32.audio_encoder(window, window)
    with pytest.raises(ValueError, match="AUDIO_WINDOW must have shape"):
        ort_fp32.audio_encoder(window[:, :100])
    with pytest.raises(ValueError, match="exported for preset 'tiny'"):
        load_onnx_runners(export_root, "cpu")
    with pytest.raises(FileNotFoundError, match="export first"):
        load_onnx_runners(export_root / "nothing")
    assert isinstance(ort_fp32.denoiser, OrtRunner)


# --- FP8 -------------------------------------------------------------------------------------------


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


@pytest.mark.parametrize("name", FP8_NETWORKS)
def test_fp8_graph_structure(export_root, name):
    fp32 = graph.load_model(export_root / "fp32" / f"{name}.onnx")
    model = graph.load_model(export_root / "fp8" / f"{name}.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    prod = _producers(model)
    policy = POLICIES[name]
    expected = {l.node for l in linear_layers(fp32) if policy.decide(l.path)}
    assert expected, "the policy must select some layers"
    quantized, kept = set(), 0
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        path = module_path(n)
        w, a = prod.get(n.input[1]), prod.get(n.input[0])
        if w is not None and w.op_type == "DequantizeLinear":
            quantized.add(n.name)
            assert inits[w.input[0]].data_type == TensorProto.FLOAT8E4M3FN  # FP8 weight
            scale = numpy_helper.to_array(inits[w.input[1]])
            out_channels = inits[w.input[0]].dims[next(a.i for a in w.attribute if a.name == "axis")]
            assert scale.shape == (out_channels,) and np.all(scale > 0)  # per output channel
            assert a.op_type == "DequantizeLinear" and prod[a.input[0]].op_type == "QuantizeLinear"
            act_scale = numpy_helper.to_array(inits[a.input[1]])
            assert act_scale.shape == () and act_scale > 0 and np.isfinite(act_scale)  # per tensor
            assert not any(__import__("re").search(p, path) for p in policy.keep), path
        elif n.input[1] in inits:  # a linear layer left in high precision
            kept += 1
            assert not policy.decide(path) and (a is None or a.op_type != "DequantizeLinear"), path
    assert quantized == expected
    if name != "audio_encoder":
        assert kept >= 5  # modulation, timestep/prompt/patch embeddings, final projection stay high precision
    for n in model.graph.node:  # softmax and norms see no quantized inputs
        if n.op_type in ("Softmax", "LayerNormalization"):
            assert all(prod.get(i) is None or prod[i].op_type != "DequantizeLinear" for i in n.input)


def test_fp8_error_bounds(export_root, tiny, tiny_nets):
    evaluation = record_streams(tiny, tiny_nets, streams=2, chunks=5, seed=77)  # unseen streams
    manifest = Manifest.load(export_root / "fp8")
    for name, spec in network_specs(tiny).items():
        err = network_error(export_root / "fp32" / f"{name}.onnx", export_root / "fp8" / f"{name}.onnx", spec,
                            evaluation.calls[name])
        print(f"{name} ({manifest.networks[name]['precision']}): {err}")
        if name == "vae_decoder":
            assert err["psnr_db"] > DECODER_PSNR_BOUND and err["max_abs"] <= DECODER_MAX_BOUND
        elif name == "text_encoder":
            assert err["max_abs"] == 0.0
        else:
            assert err["rel_l2"] < REL_L2_BOUND[name]
            assert manifest.networks[name]["error_vs_fp32"]["rel_l2"] < REL_L2_BOUND[name]


def test_fp8_stream_stays_close_to_torch(tiny, tiny_runners, export_root):
    chunks = speech_chunks(8, seed=2)
    ref = run_stream(tiny, tiny_runners, 3, chunks).astype(np.float64)
    got = run_stream(tiny, load_onnx_runners(export_root, tiny, precision="fp8", threads=1), 3, chunks).astype(np.float64)
    psnr = [psnr_db(((r - g) ** 2).mean()) for r, g in zip(ref, got)]
    print("FP8 runners vs torch, PSNR per chunk:", [f"{p:.1f}" for p in psnr])
    assert min(psnr) > 45.0  # measured 57.7 dB


# --- TensorRT ----------------------------------------------------------------------------------------


def test_exported_graphs_pass_the_tensorrt_check(export_root, tiny):
    specs = network_specs(tiny)
    for precision in ("fp32", "fp8"):
        for name in NETWORK_NAMES:
            model = tensorrt_onnx(export_root / precision / f"{name}.onnx")
            found = check_tensorrt_compat(model, specs[name])
            assert not errors(found), f"{precision}/{name}: {found}"


def test_half_conversion_keeps_fragile_parts_float32(export_root):
    model = graph.infer_shapes(tensorrt_onnx(export_root / "fp8" / "denoiser.onnx"))
    types = graph.tensor_types(model)
    ops = {}
    for n in model.graph.node:
        ops.setdefault(n.op_type, []).append(n)
    assert all(types[n.input[0]] == TensorProto.FLOAT for n in ops["Cos"] + ops["LayerNormalization"])
    assert all(types[n.input[0]] == TensorProto.FLOAT16 for n in ops["MatMul"] + ops["Softmax"])
    assert all(types[n.input[0]] == TensorProto.FLOAT16 for n in ops["QuantizeLinear"])


def _model(nodes, inputs, outputs, inits=(), opset=20):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_tensorrt_check_flags_what_the_parser_rejects():
    vi = helper.make_tensor_value_info
    f8 = np.array(0, dtype=__import__("ml_dtypes").float8_e4m3fn)
    cases = {
        "UINT8 is only supported as network I/O": _model(
            [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]), helper.make_node("Cast", ["t"], ["y"], to=1)],
            [vi("x", TensorProto.UINT8, [2, 3])], [vi("y", TensorProto.FLOAT, [3, 2])]),
        "not supported by TensorRT": _model(
            [helper.make_node("Unique", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, [4])], [vi("y", TensorProto.FLOAT, None)]),
        "opset 23": _model(
            [helper.make_node("Relu", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, [4])], [vi("y", TensorProto.FLOAT, [4])],
            opset=23),
        "per-tensor": _model(
            [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)],
            [vi("x", TensorProto.FLOAT, [2, 4])], [vi("y", TensorProto.FLOAT, [2, 4])],
            [numpy_helper.from_array(np.ones(4, np.float32), "s"), numpy_helper.from_array(np.zeros(4, f8.dtype), "z")]),
        "zero point must be zero": _model(
            [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
            [vi("x", TensorProto.FLOAT, [2, 4])], [vi("y", TensorProto.FLOAT, [2, 4])],
            [numpy_helper.from_array(np.array(1.0, np.float32), "s"), numpy_helper.from_array(np.array(1, np.int8), "z")]),
        "outside the standard ONNX domain": _model(
            [helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")],
            [vi("x", TensorProto.FLOAT, [4])], [vi("y", TensorProto.FLOAT, [4])]),
        "must be a build-time constant": _model(
            [helper.make_node("ReduceMean", ["x", "axes"], ["y"])],
            [vi("x", TensorProto.FLOAT, [2, 4]), vi("axes", TensorProto.INT64, [1])], [vi("y", TensorProto.FLOAT, None)]),
    }
    for message, model in cases.items():
        found = errors(check_tensorrt_compat(model))
        assert any(message in str(f) for f in found), (message, [str(f) for f in found])
    spec = network_specs(__import__("flowact.presets", fromlist=["get_preset"]).get_preset("tiny"))["text_encoder"]
    dynamic = _model([helper.make_node("Identity", ["PROMPT_IDS"], ["y"])],
                     [vi("PROMPT_IDS", TensorProto.INT64, ["batch", "tokens"])], [vi("y", TensorProto.INT64, None)])
    assert any("optimisation profiles cover only the batch" in str(f) for f in check_tensorrt_compat(dynamic, spec))


def test_tensorrt_absence_is_reported_clearly(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed")
    except Exception:
        pass
    from flowact.cli import main
    from flowact.export.tensorrt import TensorRTUnavailable, import_tensorrt

    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        import_tensorrt()
    assert main(["export", "trt", "--preset", "tiny", "--out", str(tmp_path)]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().out


def test_tensorrt_engines_match_onnx_runtime(export_root, tiny, ort_fp32, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT runners need a CUDA GPU")
    from flowact.export.tensorrt import build_trt
    from flowact.runtime.tensorrt import load_trt_runners

    build_trt(tiny, export_root, say=print)
    runners = load_trt_runners(export_root, tiny)
    for name, spec in network_specs(tiny).items():
        inputs = spec.sample_inputs(3, seed=1)
        got = getattr(runners, name)(*(x.cuda() for x in inputs)).cpu()
        ref = getattr(ort_fp32, name)(*inputs)
        tol = 2.0 if ref.dtype == torch.uint8 else 0.1 * float(ref.abs().max()) + 1e-3
        assert report(f"TensorRT {name}", got, ref) <= tol


def test_gpu_denoiser_benchmark_runs_on_cpu(tmp_path):
    """The GPU script's bf16 and FP8 (torch._scaled_mm) paths, smoke-tested on the tiny preset on CPU."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "gpu_denoiser.py"
    spec = importlib.util.spec_from_file_location("gpu_denoiser", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.json"
    assert module.main(["--preset", "tiny", "--device", "cpu", "--warmup", "0", "--iters", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["fp8_layers"] == 16 and result["fp8_vs_bf16_rel_l2"] < 0.05
    assert result["bf16"]["nfe_linear_tflop_fp8_eligible"] > 0


def test_weight_source_keys_without_building_networks(tmp_path, tiny, tiny_nets):
    from flowact.export.onnx import WeightSource

    tiny_nets.save(tmp_path / "ckpt")
    source = WeightSource(tiny, checkpoint=tmp_path / "ckpt")
    key = source.key("denoiser")
    assert source._nets is None  # hashing a checkpoint builds nothing
    assert WeightSource(tiny, seed=1).key("denoiser") != WeightSource(tiny, seed=2).key("denoiser")
    (tmp_path / "ckpt" / "denoiser.safetensors").write_bytes(b"changed")
    assert WeightSource(tiny, checkpoint=tmp_path / "ckpt").key("denoiser") != key


def test_weight_source_keys_sharded_checkpoints(tmp_path, tiny, tiny_nets, monkeypatch):
    """A network stored in shards (the shipped cpu denoiser) is keyed by all of its shards."""
    from flowact.export.onnx import WeightSource
    from flowact.train import common

    monkeypatch.setattr(common, "SHARD_BYTES", 100_000)
    common.save_networks(tiny_nets, tmp_path, dtype=torch.float16)
    shards = sorted(tmp_path.glob("denoiser-*-of-*.safetensors"))
    assert len(shards) > 1
    key = WeightSource(tiny, checkpoint=tmp_path).key("denoiser")
    shards[-1].write_bytes(b"changed")
    assert WeightSource(tiny, checkpoint=tmp_path).key("denoiser") != key


def test_big_models_use_external_data(tmp_path, tiny, tiny_nets, monkeypatch):
    """Models past protobuf's 2 GB (r1-480p) keep weights in <name>.onnx.data; every step handles it."""
    monkeypatch.setattr(graph, "EXTERNAL_DATA_BYTES", 10_000)
    files = export_onnx(tiny, tmp_path, names=["text_encoder"], nets=tiny_nets, say=lambda s: None)
    path = files["text_encoder"]
    assert path.with_name(path.name + ".data").is_file() and path.stat().st_size < 100_000
    spec = network_specs(tiny)["text_encoder"]
    (ids,) = spec.sample_inputs(2)
    with torch.no_grad():
        assert report("external data", OrtRunner(path, spec)(ids), tiny_nets.text_encoder(ids)) < 1e-4
    half = tensorrt_onnx(path)  # weightless shape inference path
    assert not errors(check_tensorrt_compat(half, spec))
    graph.save_model(half, tmp_path / "half.onnx")
    assert (tmp_path / "half.onnx.data").is_file()
    assert OrtRunner(tmp_path / "half.onnx", spec)(ids).shape == (2, tiny.prompt_tokens, tiny.text_dim)
