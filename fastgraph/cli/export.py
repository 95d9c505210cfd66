"""``fastgraph export``: its options, the run, and the summary table."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from fastgraph.cli.common import positive
from fastgraph.core.devices import device_name, resolve_device
from fastgraph.core.errors import UserError
from fastgraph.core.outputs import check_outputs, write_json
from fastgraph.core.tracing import traced_model
from fastgraph.deploy.batches import REFERENCE_CHUNK, pytorch_logits, run_engine
from fastgraph.deploy.pipeline import (
    TTA_LEVELS,
    HalfPrecision,
    compare,
    inference_graph,
    load_trained_graph,
    spread_indices,
)


def _batch_arg(text: str) -> int | None:
    """``--batch``: ``dynamic`` (None) or a positive integer."""
    if text == "dynamic":
        return None
    try:
        return positive(int)(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (give a positive integer or 'dynamic')") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``fastgraph export`` options to its subparser."""
    p.add_argument("model", help="plain PyTorch model file (.py)")
    p.add_argument("--entry", help="function or class in the file that builds the model")
    p.add_argument("--checkpoint", metavar="CKPT", help="trained weights: a state_dict file, or a "
                   "`fastgraph train --checkpoint` folder or file (default: the file's initial weights)")
    p.add_argument("--weights", choices=("auto", "trained", "ema"), default="auto",
                   help="of a training checkpoint: the trained or the EMA weights "
                        "(default: those the recipe evaluates)")
    p.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx",
                   help="engine format (default onnx)")
    p.add_argument("--tta", choices=tuple(TTA_LEVELS), default="flip",
                   help="test-time augmentation folded into the graph (default flip)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="engine precision (default fp32)")
    p.add_argument("--batch", type=_batch_arg, default=None, metavar="N|dynamic",
                   help="fixed batch size, or dynamic (default)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default 18)")
    p.add_argument("--out", help="engine file (default <model>.onnx or <model>.ep in the current folder)")
    p.add_argument("--data", help="CIFAR-10 (folder or archive; default $FASTGRAPH_DATA)")
    p.add_argument("--verify-images", type=int, default=10_000, metavar="N",
                   help="test images to verify on, spread over all classes (default all 10,000)")
    p.add_argument("--device", default=None,
                   help="device for PyTorch and the engine (default cuda if present)")
    p.add_argument("--json", metavar="FILE", help="write the summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``fastgraph export``; returns the exit code (a ``UserError`` is one line, exit 2)."""
    from fastgraph.data import load_cifar10, normalize

    if args.format == "tensorrt":  # fail before any work when the extra is missing
        from fastgraph.deploy.tensorrt import require_tensorrt

        require_tensorrt()
    else:
        from fastgraph.deploy.onnx import MIN_OPSET, require_package

        if args.opset < MIN_OPSET:
            raise UserError(f"--opset must be >= {MIN_OPSET}, got {args.opset}")
        for package in ("onnx", "onnxscript", "onnxruntime"):
            require_package(package)
    device = resolve_device(args.device)
    if args.format == "tensorrt" and device.type != "cuda":
        raise UserError("--format tensorrt runs on a CUDA device; drop --device cpu")

    # Unwritable outputs, a bad checkpoint and a bad model file are named before the data is
    # looked for (it may be absent, or take seconds to decode).
    suffix = ".onnx" if args.format == "onnx" else ".ep"
    inputs = {"model file": args.model, "checkpoint": args.checkpoint, "data": args.data}
    out = check_outputs({"--out": args.out or Path.cwd() / f"{Path(args.model).stem}{suffix}",
                         "--json": args.json}, inputs=inputs)["--out"]
    if args.checkpoint:
        from fastgraph.training.trained import read_weights

        read_weights(args.checkpoint)
    traced_model(args.model, args.entry)
    data = load_cifar10(args.data)
    index = spread_indices(args.verify_images, len(data.test_images))
    test_x, test_y = normalize(data.test_images[index]), data.test_labels[index]
    gm, weights_info, check_batch = load_trained_graph(args.model, args.entry, args.checkpoint, data,
                                                       args.weights)
    if weights_info["kind"] == "untrained":
        print("fastgraph export: no --checkpoint: exporting the model file's initial (untrained) weights",
              file=sys.stderr)
    graph, steps = inference_graph(gm, tta=args.tta, batch=check_batch)
    module = HalfPrecision(graph) if args.precision == "fp16" else graph

    reference = pytorch_logits(graph, test_x, device)
    if args.format == "onnx":
        from fastgraph.deploy.onnx import export_onnx, run_session, session

        engine_info = export_onnx(copy.deepcopy(module).cpu(), out, batch=args.batch, opset=args.opset)
        sess = session(out, device)
        engine_info["provider"] = sess.get_providers()[0]
        logits = run_session(sess, test_x, batch=args.batch)
        probe = 1 if args.batch is None else args.batch  # a second batch size on a dynamic axis
        probe_logits = run_session(sess, test_x[:probe], batch=args.batch, chunk=probe)
    else:
        from fastgraph.deploy.tensorrt import compile_tensorrt

        engine, engine_info = compile_tensorrt(module, out, batch=args.batch, precision=args.precision,
                                               device=device)
        engine_info["provider"] = "TensorRT"
        logits = run_engine(engine, test_x, args.batch, device)
        probe = 1 if args.batch is None else args.batch
        probe_logits = run_engine(engine, test_x[:probe], args.batch, device, chunk=probe)
    check = compare(reference, logits, test_y)
    check["batch_sizes_run"] = sorted({args.batch or REFERENCE_CHUNK, probe})
    check["max_abs_logit_diff_other_batch"] = (probe_logits - reference[:probe]).abs().max().item()

    result = {
        "model": str(Path(args.model).resolve()), "weights": weights_info, "format": args.format,
        "tta": args.tta, "precision": args.precision, "batch": args.batch or "dynamic",
        "out": str(out.resolve()), "device": device_name(device), "torch": torch.__version__,
        "passes": steps, "engine": engine_info, "verification": check,
    }
    if args.json:
        write_json(args.json, result)
    print_summary(result)
    return 0 if check["passed"] else 1


def print_summary(result: dict, console=None) -> None:
    """The export summary as a rich table (the same numbers as the JSON)."""
    from rich.console import Console
    from rich.table import Table

    from fastgraph.core.console import si

    console = console or Console()
    v, e, w = result["verification"], result["engine"], result["weights"]
    passes = ", ".join(f"{s['name']} ({s['status']}, {s['rewrites']})" for s in result["passes"])
    t = Table(title=f"fastgraph export: {Path(result['model']).name} -> {result['format']}",
              title_justify="left", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")  # a path folds rather than ends in an ellipsis
    weights = w["kind"] + (f" {w['path']}" if w.get("path") else "")
    if w["kind"] == "training checkpoint":
        weights += f" ({w['weights']} weights, recipe {w.get('recipe')})"
    exporter = e.get("exporter", e.get("compiler", ""))
    if e.get("fallback_reason"):
        exporter += f"; first exporter failed: {e['fallback_reason']}"
    rows = [
        ("weights", weights),
        ("inference passes", passes or "none"),
        ("engine", f"{result['out']} ({si(e['bytes'], 'B')})"),
        ("exporter", exporter),
        ("opset / operators", f"{e['opset']}: {', '.join(e['operators'])}" if "opset" in e else "-"),
        ("batch", f"{result['batch']} (dynamic axis: {e['dynamic_batch']})"),
        ("TTA, precision", f"{result['tta']}, {result['precision']}"),
        ("runtime", f"{e['provider']} on {result['device']}"),
        ("verified on", f"{v['images']} real CIFAR-10 test images, batch sizes {v['batch_sizes_run']}"),
        ("max |logit diff|", f"{v['max_abs_logit_diff']:.3g} "
                             f"(other batch size: {v['max_abs_logit_diff_other_batch']:.3g})"),
        ("top-1 agreement", f"{100 * v['top1_agreement']:.2f}%"),
        ("accuracy PyTorch / engine",
         f"{100 * v['accuracy_pytorch']:.2f}% / {100 * v['accuracy_engine']:.2f}%"),
        ("accuracy check", ("[green]passed" if v["passed"] else "[red]FAILED")
         + f": |diff| {100 * v['accuracy_diff']:.3f} points <= {100 * v['tolerance']:.2f}"),
    ]
    for what, value in rows:
        t.add_row(what, value)
    console.print(t)
