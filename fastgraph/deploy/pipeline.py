"""Export the inference graph, with flip TTA folded in, to ONNX or TensorRT, and verify it on CIFAR-10.

``fastgraph export MODEL.py --checkpoint CKPT --format onnx|tensorrt`` loads the model
file and its trained weights (a state_dict or a ``fastgraph train`` checkpoint, see
:mod:`fastgraph.training.trained`), traces it, and builds the inference graph through the pass
manager in infer mode: profiling ranges stripped, fused-kernel modules swapped back to
the reference ops they compute (timm's export flags: custom kernels out, standard ops
in), ``fold_bn``, ``fuse_whitening`` where a whitening conv is present, then
``tta_flip`` at the asked level (DESIGN.md: exported engines carry the TTA). The
engine is written, reloaded and run on real CIFAR-10 test images against PyTorch
running the same graph in float32: max |logit difference|, top-1 agreement, and the
accuracy of each, which must agree within 0.05 percentage points (exit 1 otherwise).
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.fx as fx
from torch import nn

from fastgraph.core.errors import UserError

TTA_LEVELS = {"none": 0, "flip": 1, "flip-translate": 2}
ACCURACY_TOLERANCE = 0.0005  # 0.05 percentage points of test accuracy


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
    from fastgraph.core import nvtx
    from fastgraph.core.modules import PatchWhitening
    from fastgraph.core.pass_manager import run_passes, verify

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
    for a bad model file or checkpoint (see :func:`fastgraph.training.trained.load_weights`).
    """
    from fastgraph.core.loading import load_model
    from fastgraph.core.pass_manager import verification_batch
    from fastgraph.core.tracing import check_runs, trace
    from fastgraph.training.trained import load_weights, spread_training_images

    gm = trace(load_model(model, entry), model)
    images, labels = spread_training_images(data)
    check_runs(gm, images[:2])
    if checkpoint:
        gm, info = load_weights(gm, checkpoint, images=images, labels=labels, weights=weights)
    else:
        info = {"kind": "untrained", "path": None, "weights": "the model file's initialisation", "passes": []}
    return gm.eval(), info, verification_batch(images, labels)


