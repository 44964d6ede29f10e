"""edgeq W2A4 against onnxruntime fp32 and int8, side by side on this machine.

    python benchmarks/speed.py [--models resnet18,mobilenetv2_100,deit_tiny_patch16_224] [--threads 1,2] [--json]

For each timm model (random weights, 224x224, batch 1) it builds three artifacts:
onnxruntime fp32 (the torch ONNX export), onnxruntime int8 (static QDQ, per-channel
weights, unsigned 8-bit activations: U8S8, onnxruntime's fastest x86 int8 path, after
onnxruntime's quantization pre-processing) and an
edgeq module (W2A4 round-to-nearest, first and last layers at 8 bits, compiled for the
host). Then, per thread count, one fresh process loads all three and times them
interleaved (rounds of five runs of each in turn) so that machine noise hits all equally;
the table shows medians. Accuracy is not the point here (weights are random): the edgeq module is
only checked to agree with onnxruntime's run of the same QDQ model.

A second table times the kernels alone on a conv-shaped GEMM (3136x576x64, ResNet's
first 3x3 stage as im2col) and a matrix-vector product (1x4096x4096): edgeq's kernel
(2-bit weights, 4-bit activations, requantization fused) against onnxruntime's
MatMulInteger (u8 x s8) and MatMulNBits (2-bit weights, int8 compute), with GOPS and
the share of this machine's int8 peak, measured by a register-only loop of the exact
int8 dot-product sequence the CPU offers (vpmaddubsw + vpmaddwd + vpaddd on AVX2).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

MODELS = ("resnet18", "mobilenetv2_100", "deit_tiny_patch16_224")
INPUT = "input"
# what edgeq quantizes in a timm model; a cached w2a4.onnx of another revision is made again
# (2: timm ViT attention's two products at the spec's attention_bits)
W2A4_REVISION = 2
AMX_MIN_ROWS = 64  # the rows from which a VNNI build runs a layer on AMX tiles (AMX_MIN_ROWS in edgeq_kernels.c)
log = logging.getLogger("speed")


def host_target():
    """The best target this CPU runs: what 'edgeq compile' uses by default (--target host)."""
    from edgeq.targets import host_target as best_for_this_cpu

    return best_for_this_cpu()


def build(name: str, folder: Path) -> dict:
    """fp32.onnx, int8.onnx and module.so for one timm model in ``folder`` (reused; the module is rebuilt when the
    kernels change)."""
    import onnx
    import timm
    import torch
    from edgeq.kernels import toolchain

    from edgeq.quantized import quantize_module
    from edgeq.stages import compile as compile_stage
    from edgeq.stages import export as export_stage

    folder.mkdir(parents=True, exist_ok=True)
    info_path = folder / "build.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if info.get("kernel_sources") == toolchain.source_digest() and info.get("w2a4_revision") == W2A4_REVISION:
        return info
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    fp32 = folder / "fp32.onnx"
    if not (folder / "int8.onnx").exists():
        example = torch.randn(1, 3, 224, 224)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(fp32),
                input_names=[INPUT],
                output_names=["logits"],
                opset_version=17,
                dynamo=False,
            )
        _quantize_int8(fp32, folder / "int8.onnx")
    if not (folder / "w2a4.onnx").exists() or info.get("w2a4_revision") != W2A4_REVISION:
        calibration = np.random.default_rng(0).normal(0, 1, (8, 3, 224, 224)).astype(np.float32)
        quantized = quantize_module(model, calibration, "w2a4")
        qdq, _ = export_stage.build_qdq_model(quantized, torch.from_numpy(calibration[:1]))
        onnx.save(qdq, str(folder / "w2a4.onnx"))
    qdq = onnx.load(str(folder / "w2a4.onnx"))
    target = host_target()
    started = time.perf_counter()
    how = compile_stage.build(
        qdq, target, qdq.graph.input[0].name, [1, 3, 224, 224], folder / "module.so", kernels="auto"
    )
    info = {
        "model": name,
        "target": target.name,
        "build": how,
        "compile_seconds": round(time.perf_counter() - started, 1),
        "edgeq_input": qdq.graph.input[0].name,
        "kernel_sources": toolchain.source_digest(),
        "w2a4_revision": W2A4_REVISION,
    }
    info_path.write_text(json.dumps(info))
    return info


def _quantize_int8(fp32: Path, out: Path) -> None:
    """onnxruntime's recommended recipe: pre-processing (shape inference, BN and Identity folding), then static QDQ.

    Without the pre-processing only 4 of ResNet-18's 20 convolutions fuse into QLinearConv
    and the int8 model runs slower than fp32, which would flatter edgeq.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name("fp32-prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.batches = iter([{INPUT: rng.normal(0, 1, (1, 3, 224, 224)).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.batches, None)

    # onnxruntime warns on the root logger for every 1-D weight it skips (a ViT's norm scales): not this table's news
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        root.setLevel(level)


def measure(folder: Path, threads: int, runs: int) -> dict:
    """In this process (started with the thread count in its environment): interleaved medians."""
    import onnxruntime as ort
    import tvm
    from tvm import relax

    info = json.loads((folder / "build.json").read_text())
    x = np.random.default_rng(2).normal(0, 1, (1, 3, 224, 224)).astype(np.float32)

    def session(path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    fp32, int8 = session(folder / "fp32.onnx"), session(folder / "int8.onnx")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / "module.so")), tvm.cpu())
    tx = tvm.runtime.tensor(x)
    engines = {
        "edgeq_w2a4": lambda: vm["main"](tx),
        "ort_fp32": lambda: fp32.run(None, {INPUT: x}),
        "ort_int8": lambda: int8.run(None, {INPUT: x}),
    }
    # agreement of the compiled module with onnxruntime's run of the same QDQ model
    reference = _qdq_reference(folder / "w2a4.onnx", info["edgeq_input"], x)
    ours = vm["main"](tx).numpy()
    times = {name: [] for name in engines}
    for engine in engines.values():
        for _ in range(3):
            engine()
    # Rounds of a few runs per engine, with a pause between engines: thread pools keep
    # spinning for a moment after a run, and on a small machine one engine's spinning
    # workers would slow the next engine's first runs.
    per_round = 5
    for _ in range(-(-runs // per_round)):
        for name, engine in engines.items():
            time.sleep(0.05)
            for _ in range(per_round):
                started = time.perf_counter()
                engine()
                times[name].append(time.perf_counter() - started)
    return {
        "threads": threads,
        **{f"{name}_ms": float(np.median(t) * 1e3) for name, t in times.items()},
        "edgeq_max_abs_diff_vs_onnxruntime_qdq": float(np.abs(ours - reference).max()),
    }


def _qdq_reference(path: Path, input_name: str, x: np.ndarray) -> np.ndarray:
    from edgeq.qdq import onnxruntime_session

    return onnxruntime_session(path).run(None, {input_name: x})[0]


# ---------------------------------------------------------------------------------------
# Kernels alone


def _conv_call(library, packed, a, w, m: int, k: int, n: int, amx: bool = True):
    """A 1x1 convolution over m rows through edgeq_conv2d with codes out (the fused requantization); ``amx``
    False keeps a VNNI build off AMX tiles for the call."""
    from edgeq.kernels import native

    params = native.conv_params(
        in_h=m,
        in_w=1,
        in_c=k,
        out_h=m,
        out_w=1,
        out_c=n,
        kernel_h=1,
        kernel_w=1,
        stride_h=1,
        stride_w=1,
        x_zero=0,
        x_max=15,
        w_bits=packed.bits,
        w_low=packed.low,
        w_absmax=packed.absmax,
        k_padded=packed.k_padded,
        w_layout=packed.layout,
        out_zero=0,
        out_qmin=0,
        out_qmax=15,
        out_scale=1.0,
        clamp_min=0.0,
        clamp_max=3.0e38,
    )
    wsum, multiplier, bias = w.sum(1).astype(np.int32), np.full(n, 0.01, np.float32), np.zeros(n, np.float32)
    out = np.zeros((m, n), np.uint8)
    args = [
        native.ctypes.byref(params),
        library._ptr(a),
        library._ptr(packed.data),
        library._ptr(wsum),
        library._ptr(multiplier),
        library._ptr(bias),
        None,
        None,
        library._ptr(out),
    ]

    def ours(args=args):
        library.lib.edgeq_set_amx(int(amx))
        library.lib.edgeq_conv2d(*args)
        library.lib.edgeq_set_amx(1)

    return ours


def kernel_table(runs: int) -> tuple[list[dict], dict | None]:
    import onnxruntime as ort
    from edgeq.kernels import layouts, native, toolchain
    from onnx import TensorProto, helper, numpy_helper

    compiler, flags = toolchain.host_flags()
    library = native.Library(
        toolchain.build_shared(compiler, flags, Path(tempfile.gettempdir()) / "edgeq-bench-kernels")
    )
    peak = int8_peak(library)
    rng = np.random.default_rng(0)
    rows = []
    # ResNet-18's 3x3 convolutions at 224x224 (rows = output pixels, k = 9 * input channels), and a classifier row
    for m, k, n in [(3136, 576, 64), (784, 1152, 128), (196, 2304, 256), (49, 4608, 512), (1, 4096, 4096)]:
        a = rng.integers(0, 16, (m, k)).astype(np.uint8)
        w = rng.integers(-2, 2, (n, k))
        chosen = layouts.conv_layout(library.layout, 15, w, m)
        engines = {}
        on_amx = chosen.name == "vnni" and library.amx and m >= AMX_MIN_ROWS
        if on_amx:  # the VNNI build runs this layer on AMX tiles, with the same stored weights
            engines["edgeq W2A4 amx (chosen)"] = _conv_call(library, layouts.pack_weights(w, chosen), a, w, m, k, n)
        for layout in [chosen, *(c for c in layouts.candidate_layouts(library.layout, 15, w) if c != chosen)]:
            label = " (chosen)" if layout == chosen and not on_amx else ""
            engines[f"edgeq W2A4 {layout.name}{label}"] = _conv_call(
                library, layouts.pack_weights(w, layout), a, w, m, k, n, amx=False
            )

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        integer = helper.make_graph(
            [helper.make_node("MatMulInteger", ["a", "w", "az", "wz"], ["y"])],
            "g",
            [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
            [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
            [
                numpy_helper.from_array(np.ascontiguousarray(w.T.astype(np.int8)), "w"),
                numpy_helper.from_array(np.uint8(0), "az"),
                numpy_helper.from_array(np.int8(0), "wz"),
            ],
        )
        integer_session = ort.InferenceSession(
            helper.make_model(integer, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
        )
        block = 32
        nbits = helper.make_graph(
            [
                helper.make_node(
                    "MatMulNBits",
                    ["a", "b", "s"],
                    ["y"],
                    domain="com.microsoft",
                    K=k,
                    N=n,
                    bits=2,
                    block_size=block,
                    accuracy_level=4,
                )
            ],
            "g",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
            [
                numpy_helper.from_array(rng.integers(0, 256, (n, k // block, block * 2 // 8)).astype(np.uint8), "b"),
                numpy_helper.from_array(np.full(n * k // block, 0.01, np.float32), "s"),
            ],
        )
        nbits_session = ort.InferenceSession(
            helper.make_model(
                nbits, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
            ).SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
        )
        a_float = a.astype(np.float32)
        engines |= {
            "onnxruntime MatMulInteger u8s8": lambda session=integer_session, a=a: session.run(None, {"a": a}),
            "onnxruntime MatMulNBits 2-bit": lambda session=nbits_session, a=a_float: session.run(None, {"a": a}),
        }
        times = {name: [] for name in engines}
        for engine in engines.values():
            engine()
        for _ in range(runs):
            for name, engine in engines.items():
                started = time.perf_counter()
                engine()
                times[name].append(time.perf_counter() - started)
        for name, t in times.items():
            seconds = float(np.median(t))
            gops = 2 * m * k * n / seconds / 1e9
            rows.append(
                {
                    "shape": f"{m}x{k}x{n}",
                    "kernel": name,
                    "ms": seconds * 1e3,
                    "gops": gops,
                    "share_of_int8_peak": gops / peak["gops"] if peak else None,
                }
            )
    return rows, peak


def _loop_gops(function, iterations: int) -> float:
    """GOPS of a register-only loop from the kernel library (one thread), best of five; 0 where it has none."""
    import ctypes

    function.restype = ctypes.c_int64
    function(1000)
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        macs = function(iterations)
        best = max(best, 2 * macs / (time.perf_counter() - started) / 1e9)
    return best


def int8_peak(library) -> dict | None:
    """The core's int8 peak: the fastest register-only u8 x s8 loop this build and CPU offer, or None."""
    vector = _loop_gops(library.lib.edgeq_int8_peak_loop, 20_000_000)
    tiles = _loop_gops(library.lib.edgeq_amx_peak_loop, 200_000)
    loop = {"vnni": "vpdpbusd zmm (AVX-512 VNNI)", "avx2": "vpmaddubsw + vpmaddwd + vpaddd (AVX2)"}
    if tiles > vector:
        return {"gops": tiles, "loop": "tdpbusd (AMX tiles)", "vector_gops": vector, "vector_loop": loop["vnni"]}
    return {"gops": vector, "loop": loop.get(library.layout.name, "portable C")} if vector else None


# ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm model names")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per engine (median reported)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq")) / "speed",
        help="where the built models are kept between runs",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per model instead of the tables")
    parser.add_argument("--skip-kernels", action="store_true", help="only the whole-model table")
    parser.add_argument("--save", type=Path, help="also write every figure as JSON to this file")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--measure-kernels", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    threads = [int(t) for t in args.threads.split(",")]
    if args.measure:
        print(json.dumps(measure(args.measure, threads[0], args.runs)))
        return 0
    if args.measure_kernels:
        print(json.dumps(kernel_table(args.runs)))
        return 0

    results = []
    for name in args.models.split(","):
        folder = args.cache / name
        print(f"building {name} ...", file=sys.stderr)
        info = build(name, folder)
        entry = {"model": name, "build": info["build"], "target": info["target"], "threads": {}}
        for count in threads:
            environment = dict(os.environ, OMP_NUM_THREADS=str(count), TVM_NUM_THREADS=str(count))
            output = subprocess.run(
                [sys.executable, __file__, "--measure", str(folder), "--threads", str(count), "--runs", str(args.runs)],
                env=environment,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            timing = json.loads(output.strip().splitlines()[-1])
            timing["speedup_vs_ort_fp32"] = timing["ort_fp32_ms"] / timing["edgeq_w2a4_ms"]
            timing["speedup_vs_ort_int8"] = timing["ort_int8_ms"] / timing["edgeq_w2a4_ms"]
            entry["threads"][str(count)] = timing
        results.append(entry)
        if args.json:
            print(json.dumps(entry), flush=True)
    if args.json:
        return 0
    from edgeq.targets import host_cpu

    cpu = host_cpu()
    print(f"\nCPU: {cpu['model']}, {cpu['cores']} cores; SIMD: {', '.join(cpu['features']) or 'none of note'}")
    print(
        f"Whole models, 224x224, batch 1, median of {args.runs} interleaved runs (ms); "
        "edgeq path: kernels or generic TVM code"
    )
    print(
        f"{'model':<24} {'thr':>3} {'edgeq W2A4':>11} {'ort fp32':>9} {'ort int8':>9} "
        f"{'vs fp32':>8} {'vs int8':>8}  path"
    )
    for entry in results:
        for count, t in entry["threads"].items():
            print(
                f"{entry['model']:<24} {count:>3} {t['edgeq_w2a4_ms']:>11.2f} {t['ort_fp32_ms']:>9.2f} "
                f"{t['ort_int8_ms']:>9.2f} "
                f"{t['speedup_vs_ort_fp32']:>7.2f}x {t['speedup_vs_ort_int8']:>7.2f}x  {entry['build']['path']}"
            )
    rows, peak = [], None
    if not args.skip_kernels:  # in a fresh one-thread process, like the model timings
        environment = dict(os.environ, OMP_NUM_THREADS="1", TVM_NUM_THREADS="1")
        output = subprocess.run(
            [sys.executable, __file__, "--measure-kernels", "--runs", str(args.runs)],
            env=environment,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows, peak = json.loads(output.strip().splitlines()[-1])
    if args.save:
        import platform

        args.save.write_text(
            json.dumps(
                {
                    "machine": {
                        "cpu": host_cpu()["model"],
                        "cores": os.cpu_count(),
                        "cpu_features": host_cpu()["features"],
                        "python": platform.python_version(),
                    },
                    "runs": args.runs,
                    "models": results,
                    "kernels": rows,
                    "int8_peak": peak,
                },
                indent=1,
            )
            + "\n"
        )
    if not args.skip_kernels:
        peak_text = f"{peak['gops']:.0f} GOPS ({peak['loop']})" if peak else "unknown"
        if peak and "vector_gops" in peak:
            peak_text += f"; {peak['vector_gops']:.0f} GOPS on {peak['vector_loop']}"
        print(f"\nKernels alone, one thread; int8 peak of this core: {peak_text}")
        print(f"{'shape':<16} {'kernel':<32} {'ms':>8} {'GOPS':>8} {'of peak':>8}")
        for row in rows:
            share = f"{100 * row['share_of_int8_peak']:.0f}%" if row["share_of_int8_peak"] else "n/a"
            print(f"{row['shape']:<16} {row['kernel']:<32} {row['ms']:>8.3f} {row['gops']:>8.1f} {share:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
