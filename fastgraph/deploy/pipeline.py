"""Export the inference graph, with flip TTA folded in, to ONNX or TensorRT, and verify it on CIFAR-10.

``fastgraph export MODEL.py --checkpoint CKPT --format onnx|tensorrt`` loads the model
file and its trained weights (a state_dict or a ``fastgraph train`` checkpoint, see
:mod:`fastgraph.training.trained`), traces it, and builds the inference graph through the pass
manager in infer mode: profiling ranges stripped, fused-kernel modules swapped back to
the reference ops they compute (timm's export flags: custom kernels out, standard ops
in), ``fold_bn``, ``fuse_whitening`` where a whitening conv is present, then
``tta_flip`` at the asked level (DESIGN.md: exported engines carry the TTA). The
engine is written, reloaded and run on real CIFAR-10 test images against PyTorch
running the same graph in float32: max |logit difference|, absolute and relative to the
largest logit, top-1 agreement, and the accuracy of each. The logits must agree within
1e-4 (fp32) or 1e-2 (fp16) of the largest logit and the accuracies within 0.05 percentage
points (exit 1 otherwise).

:func:`export` is the job, for Python (``fastgraph.export``) and for the command.
"""

from __future__ import annotations

import copy
import io
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from rich.console import Console
from rich.table import Table
from torch import nn

from fastgraph.core.errors import UserError
from fastgraph.core.outputs import report_header

TTA_LEVELS = {"none": 0, "flip": 1, "flip-translate": 2}
ACCURACY_TOLERANCE = 0.0005  # 0.05 percentage points of test accuracy
# max |engine - PyTorch| over max |PyTorch logit|, per engine arithmetic. Relative, so that a
# model with small logits (a head scaled by 1e-3) is held to the same standard as any other
# (DESIGN.md: an absolute tolerance is blind below 1). Measured on ResNet-20 with ONNX Runtime
# on a CPU: fp32 3e-7, fp16 5e-4; a graph without its flip TTA differs by 4-6%, so these catch
# it. TensorRT builds fp32 layers in TF32 by default, whose 10-bit mantissa is fp16's: the same
# tolerance (not measured here: no TensorRT on a CPU). The PyTorch reference runs without TF32.
LOGIT_TOLERANCE = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 1e-2}


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


def check_held_tta(model: nn.Module, tta: str) -> bool:
    """Whether ``model`` already holds TTA views (``fastgraph optimize --mode infer`` puts them
    in its graph), at the level ``tta`` asks; ``UserError`` when it holds another level: the
    engine would carry its own TTA while the report names the asked one, or average views
    of views."""
    from fastgraph.core.modules import TTAViews

    held = next((m.level for m in model.modules() if isinstance(m, TTAViews)), 0)
    if held and held != TTA_LEVELS[tta]:
        name = next(k for k, v in TTA_LEVELS.items() if v == held)
        raise UserError(f"the model already holds {name} TTA in its graph (fastgraph optimize adds it): "
                        f"export it with --tta {name}, or export the model without it")
    return bool(held)


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
        UserError: an unknown ``tta``, or another than the TTA ``gm`` already holds (an
            ``optimize --mode infer`` result); a rewrite that changed the outputs (refused).
    """
    from fastgraph.core import nvtx
    from fastgraph.core.modules import PatchWhitening
    from fastgraph.core.pass_manager import run_passes, verify

    if tta not in TTA_LEVELS:
        raise UserError(f"--tta must be one of {', '.join(TTA_LEVELS)}, not {tta!r}")
    check_held_tta(gm, tta)
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


def compare(reference: torch.Tensor, engine: torch.Tensor, labels: torch.Tensor, *,
            precision: str = "fp32") -> dict:
    """Agreement of an engine's logits with PyTorch's on the same images.

    Args:
        reference, engine: float (N, classes) logits. labels: int64 (N,).
        precision: the engine's arithmetic, ``"fp32"``, ``"tf32"`` (a TensorRT fp32 engine)
            or ``"fp16"``: chooses the logit tolerance (:data:`LOGIT_TOLERANCE`).

    Returns:
        ``images``, ``max_abs_logit_diff``, ``max_rel_logit_diff`` (the absolute one over
        max |reference logit|), ``logit_tolerance``, ``top1_agreement`` (fraction),
        ``accuracy_pytorch``, ``accuracy_engine``, ``accuracy_diff`` (fractions),
        ``tolerance`` (of the accuracy) and ``passed``: the logits agree within the
        relative tolerance (so top-1 differs only where PyTorch's two best classes are
        within twice it: near ties) and the accuracies agree within 0.05 percentage
        points (below 2,000 images that means the same number of correct images).
        Another engine shape (a wrong number of images or classes) fails with an
        infinite difference.
    """
    if engine.shape != reference.shape:
        inf = float("inf")
        return {"images": len(labels), "max_abs_logit_diff": inf, "max_rel_logit_diff": inf,
                "logit_tolerance": LOGIT_TOLERANCE[precision], "top1_agreement": 0.0,
                "accuracy_pytorch": (reference.argmax(1) == labels).double().mean().item(),
                "accuracy_engine": 0.0, "accuracy_diff": 1.0, "tolerance": ACCURACY_TOLERANCE,
                "passed": False}
    ref_top1, eng_top1 = reference.argmax(1), engine.argmax(1)
    acc_ref = (ref_top1 == labels).double().mean().item()
    acc_eng = (eng_top1 == labels).double().mean().item()
    diff = abs(acc_eng - acc_ref)
    abs_diff = (reference.double() - engine.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    rel_diff = abs_diff / scale if scale > 0 else (0.0 if abs_diff == 0 else float("inf"))
    logit_tolerance = LOGIT_TOLERANCE[precision]
    return {"images": len(labels), "max_abs_logit_diff": abs_diff, "max_rel_logit_diff": rel_diff,
            "logit_tolerance": logit_tolerance,
            "top1_agreement": (ref_top1 == eng_top1).double().mean().item(),
            "accuracy_pytorch": acc_ref, "accuracy_engine": acc_eng, "accuracy_diff": diff,
            "tolerance": ACCURACY_TOLERANCE,
            "passed": rel_diff <= logit_tolerance and diff <= ACCURACY_TOLERANCE + 1e-12}


# ---------------------------------------------------------------------- the job


def load_trained_graph(model: nn.Module | str | os.PathLike, entry: str | None, checkpoint: str | None, data,
                       weights: str = "auto"):
    """(traced GraphModule with the weights, weights description, real training batch for pass checks).

    ``model`` is a model file (built with ``entry``, see
    :func:`fastgraph.core.loading.load_model`) or an ``nn.Module``, traced as it is (not
    modified). ``data`` is a loaded CIFAR-10 (``fastgraph.data.load_cifar10``). Raises
    ``UserError`` for a bad model file or checkpoint (see
    :func:`fastgraph.training.trained.load_weights`).
    """
    from fastgraph.core.loading import load_model
    from fastgraph.core.pass_manager import verification_batch
    from fastgraph.core.tracing import check_runs, trace
    from fastgraph.training.trained import load_weights, spread_training_images

    gm = trace(model) if isinstance(model, nn.Module) else trace(load_model(model, entry), model)
    images, labels = spread_training_images(data)
    check_runs(gm, images[:2])
    if checkpoint:
        gm, info = load_weights(gm, checkpoint, images=images, labels=labels, weights=weights)
    elif isinstance(model, nn.Module):
        info = {"kind": "module", "path": None, "weights": "the module's own", "passes": []}
    else:
        info = {"kind": "untrained", "path": None, "weights": "the model file's initialisation", "passes": []}
    return gm.eval(), info, verification_batch(images, labels)


FORMATS = ("onnx", "tensorrt")


@torch.no_grad()
def check_classes(gm: nn.Module, images: torch.Tensor, classes: tuple[str, ...]) -> None:
    """``UserError`` unless ``gm`` (eval) gives one logit per CIFAR-10 class on (n, 3, H, W) ``images``.

    The engine is verified on CIFAR-10 test images and labels at their size: a model with
    another head (an ImageNet ResNet-50's 1,000 classes) would be exported at 32x32 and
    "verified" against labels it does not predict. Outputs other than one tensor are left
    to the verification, which names them.
    """
    out = gm(images)
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] != len(classes):
        raise UserError(f"the model gives {out.shape[1]} logits per image, but fastgraph export verifies "
                        f"on CIFAR-10 ({len(classes)} classes, {'x'.join(map(str, images.shape[1:]))} "
                        f"images): export a {len(classes)}-class CIFAR-10 model")


class UntrainedWeightsWarning(UserWarning):
    """:func:`export` of a model file without a checkpoint: the engine holds the file's initial weights."""


def verification_batch_sizes(images: int, batch: int | None, chunk: int) -> set[int]:
    """The batch sizes an engine runs at on ``images`` images: ``batch`` when fixed (the last
    batch is padded to it), else chunks of ``chunk`` images and what is left after them."""
    if batch is not None:
        return {batch}
    return {min(chunk, images - start) for start in range(0, images, chunk)}


def check_export_options(format: str, opset: int, device: str | torch.device | None, *, tta: str = "flip",
                         precision: str = "fp32", batch: int | None = None, weights: str = "auto",
                         checkpoint: str | os.PathLike | None = None):
    """The ``torch.device`` to export on, once every option is known to work here.

    Raises:
        UserError: an unknown format, TTA, precision or weights choice, ``weights`` other than
            ``"auto"`` without a ``checkpoint`` to choose from, a batch that is
            not a positive integer, an ONNX opset below 17 or above the newest the installed
            onnx knows (see :func:`fastgraph.deploy.onnx.check_opset`), a missing extra (``onnx``,
            ``onnxscript``, ``onnxruntime``; ``torch_tensorrt``), TensorRT without CUDA, or a
            device that is not there (see :func:`fastgraph.core.devices.resolve_device`).
    """
    from fastgraph.core.devices import resolve_device

    for what, value, known in (("format", format, FORMATS), ("tta", tta, tuple(TTA_LEVELS)),
                               ("precision", precision, ("fp32", "fp16")),
                               ("weights", weights, ("auto", "trained", "ema"))):
        if value not in known:
            raise UserError(f"--{what} must be one of {', '.join(known)}, not {value!r}")
    if weights != "auto" and checkpoint is None:  # else the model's own weights would go out unsaid
        raise UserError(f"--weights {weights} chooses among the weights of a training checkpoint: "
                        "give --checkpoint, or drop --weights to export the model's own weights")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise UserError(f"--batch must be a positive integer or None (dynamic), not {batch!r}")
    if format == "tensorrt":  # fail before any work when the extra is missing
        from fastgraph.deploy.tensorrt import require_tensorrt

        require_tensorrt()
    else:
        from fastgraph.deploy.onnx import check_opset, require_package

        for package in ("onnx", "onnxscript", "onnxruntime"):
            require_package(package)
        check_opset(opset)
    device = resolve_device(device)
    if format == "tensorrt" and device.type != "cuda":
        raise UserError("--format tensorrt runs on a CUDA device; drop --device cpu")
    return device


def summary_table(result: dict) -> Table:
    """The export summary (``ExportReport.to_dict()`` or a ``--json`` file) as a rich table:
    weights, passes, engine, exporter, operators, batch, runtime and the verification."""
    from fastgraph.core.console import si

    v, e, w = result["verification"], result["engine"], result["weights"]
    passes = ", ".join(f"{s['name']} ({s['status']}, {s['rewrites']})" for s in result["passes"])
    t = Table(title=f"fastgraph export: {Path(result['model']).name} -> {result['format']}",
              title_justify="left", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")  # a path folds rather than ends in an ellipsis
    weights = w["kind"] + (f" {w['path']}" if w.get("path") else "")
    if w["kind"] == "training checkpoint":
        weights += f" ({w['weights']} weights, recipe {w.get('recipe')}"
        if w.get("epochs") is not None:
            weights += f", epoch {w.get('epoch')} of {w['epochs']:g}" + ("" if w.get("finished") else
                                                                         ", training not finished")
        weights += ")"
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
        ("input", "x".join(map(str, e["input"]["shape"])) + f" {e['input']['dtype']}, CIFAR-10 normalised"
         if "input" in e else "-"),
        ("TTA, precision", f"{result['tta']}, {result['precision']}"),
        ("runtime", f"{e['provider']} on {result['device']}"),
        ("verified on", f"{v['images']} real CIFAR-10 test images, batch sizes {v['batch_sizes_run']}"),
        ("max |logit diff|", f"{v['max_abs_logit_diff']:.3g}" + (
            f" (batch size {v['other_batch_size']}: {v['max_abs_logit_diff_other_batch']:.3g})"
            if v.get("max_abs_logit_diff_other_batch") is not None else "")),
        ("max relative logit diff", f"{v['max_rel_logit_diff']:.3g} (tolerance {v['logit_tolerance']:g} "
         "of max |PyTorch logit|)"),
        ("top-1 agreement", f"{100 * v['top1_agreement']:.2f}%"),
        ("accuracy PyTorch / engine",
         f"{100 * v['accuracy_pytorch']:.2f}% / {100 * v['accuracy_engine']:.2f}%"),
        ("check", ("[green]passed" if v["passed"] else "[red]FAILED")
         + f": relative logit diff {v['max_rel_logit_diff']:.3g} <= {v['logit_tolerance']:g}, "
           f"|accuracy diff| {100 * v['accuracy_diff']:.3f} points <= {100 * v['tolerance']:.2f}"),
    ]
    for what, value in rows:
        t.add_row(what, value)
    return t


@dataclass
class ExportReport:
    """What :func:`export` wrote and how it verified, as ``fastgraph export --json`` writes it.

    Attributes:
        model: the model file's absolute path, or ``"<Class> (nn.Module)"``.
        weights: where the weights came from: ``kind`` ("untrained", "module",
            "state_dict", "training checkpoint"), ``path``, ``weights`` (trained or EMA)...;
            of a training checkpoint also ``epoch`` (written after it), ``epochs`` (the run's
            planned count) and ``finished`` (False: written mid-training, a warning says so).
        format, tta, precision: as asked. batch: the fixed batch size, or "dynamic".
        out: the engine file's absolute path. device: where it ran. torch: its version.
        passes: the inference graph's steps (``reference_ops``, ``fold_bn``,
            ``fuse_whitening``, ``tta_flip``): name, exactness, status, rewrites, measured
            difference, tolerance, message.
        engine: the exporter's record (exporter or compiler, opset, operators, bytes,
            dynamic batch, runtime ``provider``, and ``input``: its name, shape (``"batch"``
            for a dynamic axis), dtype, normalisation and class names, also stored in an
            ONNX file's metadata as JSON under ``fastgraph.input``).
        verification: against PyTorch on real test images (:func:`compare`, plus
            ``batch_sizes_run``: every batch size the engine ran on, ``other_batch_size``:
            the one a dynamic engine was also checked at, beyond those of the main run
            (None when there is none: a fixed batch), and ``max_abs_logit_diff_other_batch``
            at it (None likewise); ``max_rel_logit_diff`` and ``passed`` cover it too).
        header: schema, versions, commit and date (``fastgraph.core.outputs.report_header``).
    """

    model: str
    weights: dict
    format: str
    tta: str
    precision: str
    batch: int | str
    out: str
    device: str
    torch: str
    passes: list[dict]
    engine: dict
    verification: dict
    header: dict = field(default_factory=report_header, repr=False)

    @property
    def passed(self) -> bool:
        """The engine's logits agree with PyTorch's within the relative tolerance of its precision
        (at every batch size verified) and its accuracy within 0.05 percentage points."""
        return bool(self.verification["passed"])

    def to_dict(self) -> dict:
        """Exactly the JSON ``fastgraph export --json`` writes."""
        body = {k: v for k, v in asdict(self).items() if k != "header"}
        return {**self.header, **body}

    def __rich__(self) -> Table:
        """The summary table ``fastgraph export`` prints."""
        return summary_table(self.to_dict())

    def __str__(self) -> str:
        """The summary table as plain text at the terminal's width (80 columns when not a terminal)."""
        text = io.StringIO()
        Console(file=text).print(self)
        return text.getvalue()


def export(model: nn.Module | str | os.PathLike, path: str | os.PathLike, *, tta: str = "flip",
           format: str = "onnx", checkpoint: str | os.PathLike | None = None, weights: str = "auto",
           precision: str = "fp32", batch: int | None = None, opset: int = 18,
           data: str | os.PathLike | None = None, verify_images: int = 10_000,
           device: str | torch.device | None = None, entry: str | None = None) -> ExportReport:
    """Export the inference graph of ``model``, TTA folded in, to ``path``; verify it on CIFAR-10.

    The graph is built by :func:`inference_graph` (reference ops, ``fold_bn``,
    ``fuse_whitening``, ``tta_flip`` at the asked level, each exact step checked in
    float64), written as ONNX (``torch.onnx.export``, dynamo exporter, ``onnx.checker``)
    or a TensorRT program (``torch_tensorrt``), reloaded, and run on ``verify_images``
    real test images against PyTorch running the same graph in float32.

    Args:
        model: an ``nn.Module`` with its weights (a ``GraphModule`` from
            :func:`fastgraph.optimize` included; not modified), or a plain PyTorch model
            file (``entry``: its entry point, see :func:`fastgraph.core.loading.load_model`).
        path: the engine file (``.onnx``, or ``.ep`` for TensorRT); checked writable first.
        tta: ``"none"``, ``"flip"`` (x and its mirror, logits averaged) or
            ``"flip-translate"`` (airbench94's level 2).
        format: ``"onnx"`` (extra ``export``) or ``"tensorrt"`` (extra ``gpu``, CUDA).
        checkpoint: trained weights: a state_dict file, or a ``fastgraph train`` checkpoint
            (file or folder); weights: of a checkpoint, ``"trained"``, ``"ema"`` or
            ``"auto"`` (those the recipe evaluates); anything but ``"auto"`` needs a
            ``checkpoint``. Default: the model's own weights.
        precision: ``"fp32"`` or ``"fp16"`` (the engine takes and returns float32).
        batch: a fixed batch size, or None for a dynamic batch axis.
        opset: ONNX opset, 17 to the newest the installed onnx knows (the file has exactly it).
        data: CIFAR-10 (default ``$FASTGRAPH_DATA``, then ``~/.cache/fastgraph/cifar10``).
        verify_images: test images to verify on, spread over all classes (1..10,000).
        device: where PyTorch and the engine run (default CUDA if present).

    Returns:
        :class:`ExportReport` (``passed``: ONNX Runtime's or TensorRT's logits agree with
        PyTorch's within :data:`LOGIT_TOLERANCE` of the largest logit and its accuracy within
        0.05 points, see :func:`compare`); its ``to_dict()`` is the ``--json`` record.

    Raises:
        UserError: a bad option or missing extra (see :func:`check_export_options`), an
            unwritable ``path``, a bad checkpoint or model file, missing data, a rewrite
            that changed the outputs, or an exporter failure (one line).
    """
    from fastgraph.core.devices import device_name
    from fastgraph.core.outputs import check_outputs
    from fastgraph.core.tracing import traced_model
    from fastgraph.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10, normalize
    from fastgraph.deploy.batches import REFERENCE_CHUNK, pytorch_logits, run_engine

    device = check_export_options(format, opset, device, tta=tta, precision=precision, batch=batch,
                                  weights=weights, checkpoint=checkpoint)
    # Tracing goes through fastgraph's TTA modules, so a TTA the model holds is seen here only.
    held_tta = isinstance(model, nn.Module) and check_held_tta(model, tta)
    # An unwritable output, a bad checkpoint and a bad model file are named before the data
    # is looked for (it may be absent, or take seconds to decode).
    source = None if isinstance(model, nn.Module) else model
    out = check_outputs({"path": path}, inputs={"model file": source, "checkpoint": checkpoint,
                                                "data": data})["path"]
    state = None
    if checkpoint:
        from fastgraph.training.trained import is_training_checkpoint, read_weights

        state, _ = read_weights(checkpoint)
        state = state if is_training_checkpoint(state) else None
    if source is not None:
        traced_model(source, entry)
    cifar = load_cifar10(data)
    index = spread_indices(verify_images, len(cifar.test_images))
    test_x, test_y = normalize(cifar.test_images[index]), cifar.test_labels[index]
    gm, weights_info, check_batch = load_trained_graph(model, entry, checkpoint, cifar, weights)
    if weights_info["kind"] == "untrained":
        warnings.warn("no checkpoint: exporting the model file's initial (untrained) weights",
                      UntrainedWeightsWarning, stacklevel=2)
    if state is not None:  # a checkpoint written mid-training holds the weights of that epoch
        weights_info["epochs"] = state.get("settings", {}).get("epochs")
        weights_info["finished"] = bool(state.get("finished_run"))
        if not weights_info["finished"] and weights_info["epochs"] is not None:
            warnings.warn(f"checkpoint {weights_info['path']} was written at epoch {weights_info['epoch']} "
                          f"of {weights_info['epochs']:g}: exporting weights of an unfinished training run",
                          UserWarning, stacklevel=2)
    image_shape = tuple(test_x.shape[1:])
    check_classes(gm, check_batch[0][:2], cifar.classes)
    graph, steps = inference_graph(gm, tta="none" if held_tta else tta, batch=check_batch)
    module = HalfPrecision(graph) if precision == "fp16" else graph
    # What a runtime needs to feed the engine, in the report and (ONNX) in the file itself.
    engine_input = {"name": "images", "shape": [batch or "batch", *image_shape], "dtype": "float32",
                    "normalization": {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD),
                                      "of": "uint8 RGB values 0-255, (x - mean) / std per channel"},
                    "classes": list(cifar.classes)}

    reference = pytorch_logits(graph, test_x, device)
    sizes = verification_batch_sizes(len(test_x), batch, REFERENCE_CHUNK)
    # A dynamic axis is also checked at batch size 1, unless the main run already had it.
    probe = 1 if batch is None and 1 not in sizes else None
    if format == "onnx":
        from fastgraph.deploy.onnx import export_onnx, run_session, session

        engine_info = export_onnx(copy.deepcopy(module).cpu(), out, batch=batch, opset=opset,
                                  image_shape=image_shape,
                                  metadata={"fastgraph.input": engine_input, "fastgraph.tta": tta,
                                            "fastgraph.precision": precision})
        sess = session(out, device)
        engine_info["provider"] = sess.get_providers()[0]
        logits = run_session(sess, test_x, batch=batch, chunk=REFERENCE_CHUNK)
        probe_logits = probe and run_session(sess, test_x[:probe], batch=batch, chunk=probe)
    else:
        from fastgraph.deploy.tensorrt import compile_tensorrt

        engine, engine_info = compile_tensorrt(module, out, batch=batch, precision=precision, device=device)
        engine_info["provider"] = "TensorRT"
        logits = run_engine(engine, test_x, batch, device, chunk=REFERENCE_CHUNK)
        probe_logits = probe and run_engine(engine, test_x[:probe], batch, device, chunk=probe)
    engine_info["input"] = engine_input
    arithmetic = "tf32" if format == "tensorrt" and precision == "fp32" else precision
    check = compare(reference, logits, test_y, precision=arithmetic)
    check["batch_sizes_run"] = sorted(sizes | ({probe} if probe else set()))
    check["other_batch_size"] = probe
    check["max_abs_logit_diff_other_batch"] = None
    if probe:  # the same relative tolerance holds at the other batch size
        other = compare(reference[:probe], probe_logits, test_y[:probe], precision=arithmetic)
        check["max_abs_logit_diff_other_batch"] = other["max_abs_logit_diff"]
        check["max_rel_logit_diff"] = max(check["max_rel_logit_diff"], other["max_rel_logit_diff"])
        check["passed"] = check["passed"] and other["max_rel_logit_diff"] <= check["logit_tolerance"]
    return ExportReport(
        model=str(Path(source).resolve()) if source is not None else f"{type(model).__name__} (nn.Module)",
        weights=weights_info, format=format, tta=tta, precision=precision, batch=batch or "dynamic",
        out=str(out.resolve()), device=device_name(device), torch=torch.__version__, passes=steps,
        engine=engine_info, verification=check)
