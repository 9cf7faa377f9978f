"""`flowact export int8` (export/int8.py): what each spec says is quantized, and nothing else; the
manifest records it; the int8 runners' stream stays close to the float32 one. Tiny preset, CPU."""

import json

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from conftest import ref_image, speech_chunks
from flowact.contract import STREAM_MODEL
from flowact.benchmarks.quality import eval_avatars, precision_rows
from flowact.engine import StreamEngine
from flowact.export.int8 import export_int8, linear_nodes
from flowact.export.onnx import WeightSource
from flowact.runtime.manifest import Manifest, Precision
from flowact.runtime.onnx import load_onnx_runners
from flowact.serving.repository import Pipeline, RepositoryOptions, build_embedded_repository
from flowact.snapshot import SnapshotCodec, SnapshotError
from flowact.specs import Int8, network_specs
from flowact.stats import psnr_db
from test_stream_model import frames_of, initialize, request, start


@pytest.fixture(scope="module")
def int8_root(onnx_dir, tiny, tiny_nets):
    said = []
    export_int8(tiny, onnx_dir, source=WeightSource(tiny, nets=tiny_nets), streams=2, chunks=5, eval_calls=3,
                say=said.append)
    return onnx_dir, said


def float_products(model: onnx.ModelProto) -> int:
    """MatMuls of two activations (attention's scores and mix), which int8 leaves in float."""
    weights = {i.name for i in model.graph.initializer}
    return sum(n.op_type == "MatMul" and not weights & set(n.input) for n in model.graph.node)


def ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node]


def test_int8_export_quantizes_what_the_specs_say(int8_root, tiny, tiny_nets):
    root, said = int8_root
    directory = root / Precision.INT8.value
    manifest = Manifest.load(directory)
    assert manifest.precision == "int8"
    for name, spec in network_specs(tiny).items():
        entry, graph_ops = manifest.networks[name], ops(directory / f"{name}.onnx")
        fp32_ops = ops(root / Precision.FP32.value / f"{name}.onnx")
        if spec.int8 == Int8.DYNAMIC:  # every linear layer, and only those: attention's products stay float
            fp32, int8 = onnx.load(root / Precision.FP32.value / f"{name}.onnx"), onnx.load(directory / f"{name}.onnx")
            assert linear_nodes(fp32) and not linear_nodes(int8), name
            assert graph_ops.count("MatMulInteger") >= len(linear_nodes(fp32)) - fp32_ops.count("Gemm"), name
            assert float_products(int8) == float_products(fp32) > 0, name
            assert entry["error_vs_fp32"]["rel_l2"] < 0.3, entry  # seeded random weights; trained: benchmarks.quality
        elif spec.int8 == Int8.STATIC:  # every convolution between calibrated Q/DQ pairs
            assert graph_ops.count("Conv") == fp32_ops.count("Conv") > 0
            assert graph_ops.count("QuantizeLinear") >= graph_ops.count("Conv"), name
            assert entry["error_vs_fp32"]["psnr_db"] > 30, entry
        else:
            assert graph_ops == fp32_ops and entry["error_vs_fp32"] == {}, name
        assert entry["precision"] == (spec.int8.value if spec.int8 else "fp32"), entry
    said.clear()
    export_int8(tiny, root, source=WeightSource(tiny, nets=tiny_nets), streams=2, chunks=5, eval_calls=3, say=said.append)
    assert all("up to date" in line for line in said), said  # the same inputs: nothing rebuilt


def test_int8_stream_stays_close_to_float32(int8_root, tiny):
    root, _ = int8_root
    chunks = speech_chunks(6)
    frames = {}
    for precision in ("fp32", "int8"):
        engine = StreamEngine(tiny, load_onnx_runners(root, tiny, precision=precision, threads=1))
        stream = engine.start(ref_image(tiny), seed=2)
        frames[precision] = np.stack([engine.step([stream], [c])[0] for c in chunks]).astype(np.float64)
    psnr = psnr_db(np.mean((frames["fp32"] - frames["int8"]) ** 2))
    print(f"int8 vs fp32 frames over {len(chunks)} chunks: PSNR {psnr:.1f} dB")
    assert psnr > 25 and not np.array_equal(frames["fp32"], frames["int8"])


def test_quality_compares_precisions_over_the_stream_and_chunk_by_chunk(int8_root, tiny):
    """benchmarks.quality --precisions: the first chunk starts from the same state in both
    measurements, so its PSNR is the same; later chunks from float32's state (one chunk's error)."""
    root, _ = int8_root
    rows = precision_rows(tiny, root, eval_avatars(tiny, 2, 3, "synth"), seed=0, threads=1)
    assert set(rows) == {"onnx fp32", "onnx int8"}
    int8 = rows["onnx int8"]
    free, forced = int8["psnr_vs_fp32_per_chunk_db"], int8["one_chunk_psnr_vs_fp32_per_chunk_db"]
    assert len(free) == len(forced) == 3 and free[0] == pytest.approx(forced[0])
    assert 20 < min(forced) < max(forced) < 100 and abs(int8["lip_sync_minus_fp32"]) < 1


def test_snapshots_do_not_cross_between_int8_and_float_networks(int8_root, tiny):
    root, _ = int8_root
    runners = {p: load_onnx_runners(root, tiny, precision=p, threads=1) for p in ("fp32", "int8")}
    assert (runners["fp32"].quantized, runners["int8"].quantized) == (False, True)
    key = b"a test deployment key, 32 bytes!!"
    engine = StreamEngine(tiny, runners["fp32"])
    stream = engine.start(ref_image(tiny), seed=1)
    engine.step([stream], speech_chunks(1))
    blob = SnapshotCodec(tiny, key, "RESUME", quantized=runners["fp32"].quantized).encode(stream)
    with pytest.raises(SnapshotError, match="this server runs 'tiny' on cpu with int8 networks"):
        SnapshotCodec(tiny, key, "RESUME", quantized=True).restore(StreamEngine(tiny, runners["int8"]), blob)
    assert SnapshotCodec(tiny, key, "RESUME").restore(StreamEngine(tiny, runners["fp32"]), blob).chunk_index == 1


def test_an_int8_repository_serves_the_int8_networks(int8_root, tiny, tmp_path):
    """`flowact serve --precision int8` renders the embedded repository on the int8 directory; its stream model
    (real initialize/execute, fake pb_utils) makes the in-process int8 engine's frames. Last: it re-exports int8
    with the serving defaults."""
    root, _ = int8_root
    opts = RepositoryOptions(capacity=1, idle_ttl_s=30.0, pipeline=Pipeline.SERIAL, engine_threads=1)
    repo = build_embedded_repository("tiny", tmp_path / "repo", opts=opts, onnx_dir=root, precision="int8")
    meta = json.loads((repo / "repository.json").read_text())
    assert meta["precision"] == "int8" and all(f"/{Precision.INT8.value}/" in p for p in meta["networks"].values())
    config = text_format.Parse((repo / STREAM_MODEL / "config.pbtxt").read_text(), mc.ModelConfig())
    model, _ = initialize(config)
    try:
        assert model.engine.runners.quantized
        chunks = speech_chunks(2)
        served = [frames_of(model.execute([start("a", tiny, chunks[0], seed=3)])[0]),
                  frames_of(model.execute([request("a", chunks[1], end=True)])[0])]
    finally:
        model.finalize()
    engine = StreamEngine(tiny, load_onnx_runners(root, tiny, precision="int8", threads=1))
    stream = engine.start(ref_image(tiny, 3), seed=3)
    want = np.stack([engine.step([stream], [c])[0] for c in chunks])
    assert np.abs(np.stack(served).astype(int) - want.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="ONNX Runtime on the CPU serves fp32, int8"):
        build_embedded_repository("tiny", tmp_path / "fp8", onnx_dir=root, precision="fp8")
