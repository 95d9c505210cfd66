"""Export the inference graph, with flip TTA folded in, to ONNX or TensorRT, and verify it on CIFAR-10.

``fastgraph export MODEL.py --checkpoint CKPT --format onnx|tensorrt`` loads the model
file and its trained weights (a state_dict or a ``fastgraph train`` checkpoint, see
:mod:`fastgraph.trained`), traces it, and builds the inference graph through the pass
manager in infer mode: profiling ranges stripped, fused-kernel modules swapped back to
the reference ops they compute (timm's export flags: custom kernels out, standard ops
in), ``fold_bn``, ``fuse_whitening`` where a whitening conv is present, then
``tta_flip`` at the asked level (DESIGN.md: exported engines carry the TTA). The
engine is written, reloaded and run on real CIFAR-10 test images against PyTorch
running the same graph in float32: max |logit difference|, top-1 agreement, and the
accuracy of each, which must agree within 0.05 percentage points (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from fastgraph.cli_common import (
    check_outputs,
    device_name,
    positive,
    resolve_device,
    traced_model,
    write_json,
)
from fastgraph.errors import UserError

TTA_LEVELS = {"none": 0, "flip": 1, "flip-translate": 2}
ACCURACY_TOLERANCE = 0.0005  # 0.05 percentage points of test accuracy
REFERENCE_CHUNK = 500  # images per PyTorch / ONNX Runtime call while verifying


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


# ---------------------------------------------------------------------- the inference graph


# The fused module's activation name -> its reference module, given the CELU alpha.
_REFERENCE_ACTIVATIONS = {"celu": nn.CELU, "gelu": lambda alpha: nn.GELU(), "silu": lambda alpha: nn.SiLU()}


def reference_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """Export: every fused ``BatchNormActivation`` becomes ``nn.BatchNorm2d`` + its activation module.

    The timm idea of export flags that swap custom kernels for reference ops: exporters
    and other runtimes know BatchNorm and CELU/GELU/SiLU, not fastgraph's Triton op. The
    BatchNorm keeps the fused module's qualified name, parameters, buffers, eps and
    momentum (so its state_dict keys are unchanged and ``fold_bn`` can fold it); the
    activation is a new submodule called right after. Meant for eval-mode graphs: ghost
    batch splits, which only act in training, are dropped. Returns ``gm`` itself when it
    holds no fused module, else a new GraphModule (``gm`` untouched).
    """
    bn_act = sys.modules.get("fastgraph.kernels.bn_act")  # never imported: no fused module can exist
    if bn_act is None:
        return gm
    fused_type = bn_act.BatchNormActivation
    if not any(isinstance(m, fused_type) for m in gm.modules()):
        return gm
    from fastgraph.passes import copy_module, finish
    from fastgraph.passes._fx import unique_name

    out = copy_module(gm)
    rewrites = 0
    for node in list(out.graph.nodes):
        if node.op != "call_module" or not isinstance(out.get_submodule(node.target), fused_type):
            continue
        fused = out.get_submodule(node.target)
        ref = fused.running_mean
        bn = nn.BatchNorm2d(fused.num_features, eps=fused.eps, momentum=fused.momentum, affine=fused.affine,
                            device=ref.device, dtype=ref.dtype)
        bn.load_state_dict(fused.state_dict())
        bn.train(fused.training)
        parent, _, leaf = node.target.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, bn)
        activation = _REFERENCE_ACTIVATIONS.get(fused.activation)
        if activation is not None:
            name = unique_name(out, f"{node.target.replace('.', '_')}_{fused.activation}")
            out.add_submodule(name, activation(fused.alpha))
            with out.graph.inserting_after(node):
                act = out.graph.call_module(name, args=(node,))
            node.replace_all_uses_with(act, delete_user_cb=lambda user, a=act: user is not a)
        rewrites += 1
    return finish(out, rewrites)


def inference_graph(gm: fx.GraphModule, *, tta: str,
                    batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[fx.GraphModule, list[dict]]:
    """The eval-mode graph to export: ranges stripped, reference ops, folded BN, fused whitening, TTA.

    Args:
        gm: the traced (and trained) model; not modified.
        tta: ``none``, ``flip`` (level 1) or ``flip-translate`` (level 2, airbench94's).
        batch: real normalised images float32 (N, 3, 32, 32) and labels int64 (N,) on
            which exact rewrites are verified in float64.

    Returns:
        (the inference GraphModule, one dict per step as in ``PassReport.to_dict()``).

    Raises:
        UserError: an unknown ``tta``; a rewrite that changed the outputs (refused).
    """
    from fastgraph import nvtx
    from fastgraph.modules import PatchWhitening
    from fastgraph.pass_manager import run_passes, verify

    if tta not in TTA_LEVELS:
        raise UserError(f"--tta must be one of {', '.join(TTA_LEVELS)}, not {tta!r}")
    gm = nvtx.strip(gm)
    gm = (copy.deepcopy(gm) if gm.training else gm).eval()
    steps = []
    swapped = reference_ops(gm)
    if swapped is not gm:
        check = verify(gm, swapped, "infer", batch)
        steps.append({"name": "reference_ops", "exactness": "exact",
                      "status": "applied" if check.ok else "refused",
                      "rewrites": swapped.meta.get("fastgraph.rewrites", 0),
                      "max_output_diff": check.max_output_diff, "tolerance": check.tolerance,
                      "message": "fused kernels -> BatchNorm2d + activation"})
        if not check.ok:
            raise UserError(f"swapping fused kernels for reference ops changed the {check.worst}; "
                            "cannot export this graph faithfully")
        gm = swapped
    names = ["fold_bn"]
    if any(isinstance(m, PatchWhitening) for m in gm.modules()):
        names.append("fuse_whitening")
    options = {}
    if TTA_LEVELS[tta]:
        names.append("tta_flip")
        options["tta_flip"] = {"level": TTA_LEVELS[tta]}
    gm, report = run_passes(gm, names, mode="infer", batch=batch, options=options)
    keep = ("name", "exactness", "status", "rewrites", "max_output_diff", "tolerance", "message")
    steps += [{k: v for k, v in o.items() if k in keep} for o in report.to_dict()["passes"]]
    return gm.eval(), steps


class HalfPrecision(nn.Module):
    """Runs an fp16 copy of a module on float32 input and returns float32 outputs.

    Input float32 (N, 3, H, W); output float32. The casts are part of the exported graph,
    so an fp16 engine takes the same normalised float32 images as the fp32 one.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(module).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(torch.float16)).to(torch.float32)


# ---------------------------------------------------------------------- verification


def spread_indices(n: int, total: int) -> torch.Tensor:
    """``n`` indices spread evenly over ``range(total)`` (class-sorted test sets get every class).

    Raises:
        UserError: ``n`` outside 1..total.
    """
    from fastgraph import data

    if not 1 <= n <= total:
        raise UserError(f"--verify-images must be between 1 and {total}, got {n}")
    return data.spread_indices(n, total)


@torch.no_grad()
def pytorch_logits(module: nn.Module, images: torch.Tensor, device: torch.device,
                   chunk: int = REFERENCE_CHUNK) -> torch.Tensor:
    """float32 (N, classes) CPU logits of ``module`` (eval) on float32 (N, 3, H, W) ``images``.

    Runs on ``device`` (``module`` is moved there) in chunks of ``chunk`` images.
    """
    module = module.to(device).eval()
    return run_in_batches(lambda x: module(x.to(device)), images, batch=None, chunk=chunk,
                          description="PyTorch reference")


def compare(reference: torch.Tensor, engine: torch.Tensor, labels: torch.Tensor) -> dict:
    """Agreement of an engine's logits with PyTorch's on the same images.

    Args:
        reference, engine: float (N, classes) logits. labels: int64 (N,).

    Returns:
        ``images``, ``max_abs_logit_diff``, ``top1_agreement`` (fraction), ``accuracy_pytorch``,
        ``accuracy_engine``, ``accuracy_diff`` (fractions), ``tolerance`` and ``passed``:
        the accuracies agree within 0.05 percentage points (below 2,000 images that
        means the same number of correct images).
    """
    ref_top1, eng_top1 = reference.argmax(1), engine.argmax(1)
    acc_ref = (ref_top1 == labels).double().mean().item()
    acc_eng = (eng_top1 == labels).double().mean().item()
    diff = abs(acc_eng - acc_ref)
    return {"images": len(labels), "max_abs_logit_diff": (reference - engine).abs().max().item(),
            "top1_agreement": (ref_top1 == eng_top1).double().mean().item(),
            "accuracy_pytorch": acc_ref, "accuracy_engine": acc_eng, "accuracy_diff": diff,
            "tolerance": ACCURACY_TOLERANCE, "passed": diff <= ACCURACY_TOLERANCE + 1e-12}


# ---------------------------------------------------------------------- command


def load_trained_graph(model: str, entry: str | None, checkpoint: str | None, data, weights: str = "auto"):
    """(traced GraphModule with the weights, weights description, real training batch for pass checks).

    ``data`` is a loaded CIFAR-10 (``fastgraph.data.load_cifar10``). Raises ``UserError``
    for a bad model file or checkpoint (see :func:`fastgraph.trained.load_weights`).
    """
    from fastgraph.loading import load_model
    from fastgraph.pass_manager import verification_batch
    from fastgraph.tracing import check_runs, trace
    from fastgraph.trained import load_weights, spread_training_images

    gm = trace(load_model(model, entry), model)
    images, labels = spread_training_images(data)
    check_runs(gm, images[:2])
    if checkpoint:
        gm, info = load_weights(gm, checkpoint, images=images, labels=labels, weights=weights)
    else:
        info = {"kind": "untrained", "path": None, "weights": "the model file's initialisation", "passes": []}
    return gm.eval(), info, verification_batch(images, labels)


def run(args: argparse.Namespace) -> int:
    """Run ``fastgraph export``; returns the exit code (a ``UserError`` is one line, exit 2)."""
    from fastgraph.data import load_cifar10, normalize

    if args.format == "tensorrt":  # fail before any work when the extra is missing
        from fastgraph.export_tensorrt import require_tensorrt

        require_tensorrt()
    else:
        from fastgraph.export_onnx import MIN_OPSET, require_package

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
        from fastgraph.trained import read_weights

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
        from fastgraph.export_onnx import export_onnx, run_session, session

        engine_info = export_onnx(copy.deepcopy(module).cpu(), out, batch=args.batch, opset=args.opset)
        sess = session(out, device)
        engine_info["provider"] = sess.get_providers()[0]
        logits = run_session(sess, test_x, batch=args.batch)
        probe = 1 if args.batch is None else args.batch  # a second batch size on a dynamic axis
        probe_logits = run_session(sess, test_x[:probe], batch=args.batch, chunk=probe)
    else:
        from fastgraph.export_tensorrt import compile_tensorrt

        engine, engine_info = compile_tensorrt(module, out, batch=args.batch, precision=args.precision,
                                               device=device)
        engine_info["provider"] = "TensorRT"
        logits = _run_engine(engine, test_x, args.batch, device)
        probe = 1 if args.batch is None else args.batch
        probe_logits = _run_engine(engine, test_x[:probe], args.batch, device, chunk=probe)
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


def run_in_batches(call, images: torch.Tensor, *, batch: int | None, chunk: int = REFERENCE_CHUNK,
                   description: str = "engine") -> torch.Tensor:
    """Logits of an engine over ``images``, float32 (N, classes) on the CPU.

    ``call`` maps a float32 (n, 3, H, W) CPU batch to its logits (any float tensor on any
    device). A fixed-batch engine (``batch`` given) gets chunks of exactly ``batch``
    images, the last padded with copies of its first image and the padding's outputs
    dropped; a dynamic one gets chunks of ``chunk``. A transient progress bar in images,
    named ``description``, shows on a terminal only (see :func:`fastgraph.report.progress`).
    """
    from fastgraph.report import progress

    size = batch or chunk
    outputs = []
    with progress(f"verifying: {description}", total=len(images)) as update:
        for start in range(0, len(images), size):
            x = images[start:start + size]
            n = len(x)
            if batch and n < batch:
                x = torch.cat([x, x[:1].expand(batch - n, *x.shape[1:])])
            outputs.append(call(x)[:n].float().cpu())
            update(advance=n)
    return torch.cat(outputs)


@torch.no_grad()
def _run_engine(engine: nn.Module, images: torch.Tensor, batch: int | None, device: torch.device,
                chunk: int = REFERENCE_CHUNK) -> torch.Tensor:
    """Logits of a PyTorch-callable engine (see :func:`run_in_batches`)."""
    return run_in_batches(lambda x: engine(x.to(device)), images, batch=batch, chunk=chunk)


def print_summary(result: dict, console=None) -> None:
    """The export summary as a rich table (the same numbers as the JSON)."""
    from rich.console import Console
    from rich.table import Table

    from fastgraph.report import si

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
