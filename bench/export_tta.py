"""Throughput and accuracy of the inference graph, with and without flip TTA, across runtimes.

    python bench/export_tta.py examples/resnet9.py --checkpoint runs/page/      # GPU: everything
    python bench/export_tta.py examples/resnet9.py --device cpu --batch-sizes 1,256 \\
        --images 512 --backends eager,onnxruntime --results-dir /tmp/check      # quick CPU check

For a model file and its trained weights (a state_dict or a ``fastgraph train`` checkpoint;
without ``--checkpoint`` the model file's initial, untrained weights, which the output
says), the inference graph that ``fastgraph export`` builds (fused kernels back to
reference ops, ``fold_bn``, ``fuse_whitening``, ``tta_flip``) runs over the CIFAR-10 test
images (all 10,000 by default) on:

- ``eager``: the GraphModule in PyTorch;
- ``compile``: ``torch.compile`` of it (inductor, default mode, one compilation per batch shape);
- ``onnxruntime``: the ONNX export (dynamic batch) in ONNX Runtime, CUDA execution provider
  with I/O bound to device memory on a GPU, CPU provider otherwise;
- ``tensorrt``: Torch-TensorRT, dynamic batch [1, 10,000] (skipped where not installed),

in fp32 and fp16 (an fp16 copy of the graph behind float32 input and output), at batch
sizes 1, 256 and 10,000, with TTA none and flip. Reported per configuration: images/s
over the whole pass (median of ``--repeats`` passes) and top-1 accuracy.

Timing: the inputs are normalised float32 on the device before timing; one pass is the
loop over all batches up to the last prediction being available. On a GPU it is timed
with CUDA events and one synchronisation at the end; on CPU with ``time.perf_counter``.
Not counted: exporting, compiling (``torch.compile``, TensorRT engine builds) and a warm-up
of the first batches and the last (partial) batch shape of every configuration.

Writes ``bench/results/export_tta-<device>-<date>.json`` and ``.md`` (device, torch, runtime
versions, git commit, date, timing method, every number); the device is in the file name,
so a CPU check never passes for a GPU result.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt")
WARMUP_BATCHES = 3


def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(REPO / "examples" / "resnet9.py"), help="model file")
    p.add_argument("--entry", help="function or class in the file that builds the model")
    p.add_argument("--checkpoint",
                   help="state_dict file or `fastgraph train` checkpoint (default: untrained weights)")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--batch-sizes", type=_csv(int), default=[1, 256, 10_000])
    p.add_argument("--precisions", type=_csv(str), default=["fp32", "fp16"])
    p.add_argument("--tta", type=_csv(str), default=["none", "flip"], help="none, flip, flip-translate")
    p.add_argument("--backends", type=_csv(str), default=list(BACKENDS))
    p.add_argument("--images", type=int, default=10_000, help="test images, spread over all classes")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per configuration (median)")
    p.add_argument("--data", help="CIFAR-10 (default $FASTGRAPH_DATA)")
    p.add_argument("--results-dir", default=str(RESULTS), help="where the JSON and Markdown go")
    args = p.parse_args(argv)
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        p.error(f"unknown backends {sorted(unknown)}; known: {', '.join(BACKENDS)}")
    return args


def device_label(device: torch.device) -> tuple[str, str]:
    """(name for the record, slug for the file name)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)", "cpu"


class Clock:
    """CUDA events on a GPU (one synchronisation at the end), time.perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "CUDA events" if device.type == "cuda" else "time.perf_counter"

    def time(self, fn) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


# ------------------------------------------------------ runners: float32 (B, 3, 32, 32) -> logits


def eager_runner(module, device):
    module = module.to(device).eval()
    return lambda x: module(x)


def compile_runner(module, device):
    compiled = torch.compile(module.to(device).eval(), dynamic=False)
    return lambda x: compiled(x)


def onnx_runner(module, device, workdir: Path, name: str):
    import numpy as np

    from fastgraph.deploy.onnx import export_onnx, session

    path = workdir / f"{name}.onnx"
    info = export_onnx(copy.deepcopy(module).cpu(), path, batch=None)
    sess = session(path, device)
    provider = sess.get_providers()[0]
    input_name, output_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    if provider == "CUDAExecutionProvider":
        index = device.index or 0

        def run(x):  # I/O bound to device memory: no host round trip
            out = torch.empty((x.shape[0], 10), device=device)
            binding = sess.io_binding()
            binding.bind_input(input_name, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
            binding.bind_output(output_name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
            sess.run_with_iobinding(binding)
            return out
    else:
        def run(x):  # the CPU provider reads host memory: a GPU input is copied, and that copy is timed
            return torch.from_numpy(sess.run([output_name], {input_name: x.cpu().numpy()})[0])
    return run, f"{provider}, {info['exporter']}"


def tensorrt_runner(module, device, workdir: Path, name: str, precision: str, max_batch: int):
    from fastgraph.deploy.tensorrt import compile_tensorrt

    engine, info = compile_tensorrt(module, workdir / f"{name}.ep", batch=None, precision=precision,
                                    device=device, opt_batch=min(256, max_batch), max_batch=max_batch)
    return (lambda x: engine(x)), f"torch_tensorrt {info['torch_tensorrt']}"


# ---------------------------------------------------------------------- one configuration


def measure(run, images: torch.Tensor, labels: torch.Tensor, batch: int, clock: Clock, repeats: int):
    """(median seconds of a pass over ``images`` in batches of ``batch``, accuracy of that pass)."""
    chunks = [images[i:i + batch] for i in range(0, len(images), batch)]
    warm = chunks[:WARMUP_BATCHES] + ([chunks[-1]] if len(chunks) > WARMUP_BATCHES else [])
    with torch.no_grad():
        for x in warm:  # compilation per shape, cuDNN/TensorRT autotuning, allocator growth
            run(x)
        predictions = []

        def one_pass():
            predictions.clear()
            for x in chunks:
                predictions.append(run(x).argmax(1))

        seconds = [clock.time(one_pass) for _ in range(repeats)]
    correct = (torch.cat(predictions).to(labels.device) == labels).sum().item()
    return statistics.median(seconds), correct / len(labels)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from fastgraph.core.devices import resolve_device
    from fastgraph.core.errors import UserError
    from fastgraph.core.outputs import git_commit
    from fastgraph.data import load_cifar10, normalize
    from fastgraph.deploy.pipeline import HalfPrecision, inference_graph, load_trained_graph, spread_indices

    try:
        device = resolve_device(args.device)
        data = load_cifar10(args.data)
        gm, weights, check = load_trained_graph(args.model, args.entry, args.checkpoint, data)
        index = spread_indices(args.images, len(data.test_images))
    except UserError as exc:
        print(f"export_tta: error: {exc}", file=sys.stderr)
        return 2
    images = normalize(data.test_images[index]).to(device)
    labels = data.test_labels[index].to(device)
    clock = Clock(device)
    name, slug = device_label(device)
    untrained = weights["kind"] == "untrained"
    if untrained:
        print("export_tta: no --checkpoint: the model file's initial, untrained weights (accuracy ~10%)")
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="fastgraph-export-tta-"))
    for tta in args.tta:
        graph, _ = inference_graph(gm, tta=tta, batch=check)
        for precision in args.precisions:
            module = HalfPrecision(graph) if precision == "fp16" else copy.deepcopy(graph)
            for backend in args.backends:
                label = f"{backend}-{precision}-tta_{tta}"
                try:
                    note = ""
                    if backend == "eager":
                        run = eager_runner(module, device)
                    elif backend == "compile":
                        run = compile_runner(copy.deepcopy(module), device)
                        note = "inductor"
                    elif backend == "onnxruntime":
                        run, note = onnx_runner(module, device, workdir, label)
                    else:
                        if device.type != "cuda":
                            raise RuntimeError("TensorRT needs a CUDA device")
                        run, note = tensorrt_runner(module, device, workdir, label, precision,
                                                    max(args.batch_sizes))
                except Exception as exc:  # noqa: BLE001 - a missing runtime is recorded, not fatal
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    print(f"  {label}: skipped ({type(exc).__name__}: {first[:160]})")
                    rows.append({"backend": backend, "precision": precision, "tta": tta, "batch_size": None,
                                 "skipped": f"{type(exc).__name__}: {first[:300]}"})
                    continue
                for batch in args.batch_sizes:
                    seconds, accuracy = measure(run, images, labels, batch, clock, args.repeats)
                    rows.append({"backend": backend, "precision": precision, "tta": tta, "batch_size": batch,
                                 "images": len(labels), "seconds": seconds,
                                 "images_per_second": len(labels) / seconds, "accuracy": accuracy,
                                 "note": note})
                    print(f"  {label} batch {batch}: {len(labels) / seconds:,.0f} images/s, "
                          f"accuracy {100 * accuracy:.2f}%")
    import onnxruntime

    record = {
        "benchmark": "export_tta", "device": name, "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "commit": git_commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "timing_method": (f"{clock.method} around a whole pass over {len(labels)} test images, median of "
                          f"{args.repeats}; export/compile/engine build and warm-up batches excluded"),
        "model": str(Path(args.model).resolve()), "weights": weights, "untrained": untrained, "rows": rows,
    }
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"export_tta-{slug}-{dt.date.today().isoformat()}"
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(record))
    print(markdown(record))
    print(f"written: {out_dir / stem}.json and .md")
    return 0


def markdown(record: dict) -> str:
    lines = [f"# export_tta on {record['device']}", "",
             f"torch {record['torch']}, onnxruntime {record['onnxruntime']}, commit {record['commit']}, "
             f"{record['date']}. Timing: {record['timing_method']}.",
             f"Model {Path(record['model']).name}, weights: {record['weights']['kind']}"
             + (" (UNTRAINED: accuracies are chance level)" if record["untrained"] else ""), "",
             "| backend | precision | TTA | batch | images/s | accuracy | note |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in record["rows"]:
        if r.get("skipped"):
            lines.append(f"| {r['backend']} | {r['precision']} | {r['tta']} | - | - | - | "
                         f"skipped: {r['skipped']} |")
        else:
            lines.append(f"| {r['backend']} | {r['precision']} | {r['tta']} | {r['batch_size']} | "
                         f"{r['images_per_second']:,.0f} | {100 * r['accuracy']:.2f}% | {r['note']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
