"""What a training is asked to do: :class:`TrainOptions`, the precisions it runs in, the
timing rule its records state, and the error a diverging run raises."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fastgraph.core.errors import UserError
from fastgraph.training.recipes import Recipe

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The short form of the rule the trainer's timer phases apply (see fastgraph.training.loop).
TIMING_RULE = ("counted: the recipe's passes (whitening initialisation included), training, the final "
               "TTA evaluation; not counted: data upload, loading and tracing the model file, the "
               "passes' float64 checks (once per training), cuDNN/torch.compile warm-up, per-epoch "
               "progress evaluation")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the message names the epoch and step."""


@dataclass
class TrainOptions:
    """What to train and how; ``None`` fields take the recipe's value.

    model_path: the model file; entry: its entry point (see ``fastgraph.core.loading``).
    model: instead of a file, a zero-argument function returning a fresh ``nn.Module``
    (airbench's ``make_net``), called by every run after seeding it, so each run starts
    from its own seeded initialisation; exactly one of ``model_path`` and ``model``.
    recipe: keyword only. epochs, batch_size: override the recipe's. runs: independent
    runs (seeds ``seed, seed + 1, ...``). target: TTA accuracy (fraction) whose time to
    reach is reported.
    subset: train on N class-balanced images taken in order from the start of each class.
    test_subset: evaluate on N class-balanced test images (quick checks; claims use all).
    device: "auto", "cpu", "cuda", "cuda:1"... precision: "fp32", "fp16" or "bf16"
    (autocast; the training batches are made in that dtype). compile: torch.compile
    the training module. compile_backend: its backend ("inductor"; "aot_eager" compiles
    in seconds, for checks on a CPU); the mode is the recipe's ``[train] compile_mode``
    ("default" unless given, e.g. "max-autotune"). checkpoint_dir: write
    checkpoints there; resume: continue the one there. stochastic_depth: add the
    stochastic_depth pass with the recipe's [stochastic_depth] options. data: CIFAR-10
    path (see ``fastgraph.data.load_cifar10``). progress_eval: evaluate after every
    epoch (else after the last only; ``target`` needs it). fused_kernels: keep the
    recipe's fused-kernel passes (``fuse_bn_activation``: BatchNorm + activation on one
    Triton kernel on CUDA, its PyTorch reference elsewhere); False drops them from the
    recipe's pass list, the same function on unfused PyTorch ops, for A/B timing.
    sync_bn: in a data-parallel training on GPUs, BatchNorm statistics over the global
    batch (``torch.nn.SyncBatchNorm``) instead of each rank's share.
    """

    model_path: str | None = None
    recipe: Recipe = field(kw_only=True)
    model: Callable[[], nn.Module] | None = None
    entry: str | None = None
    epochs: float | None = None
    batch_size: int | None = None
    runs: int = 1
    seed: int = 0
    target: float | None = None
    subset: int | None = None
    test_subset: int | None = None
    device: str = "auto"
    precision: str | None = None
    compile: bool | None = None
    compile_backend: str = "inductor"
    checkpoint_dir: str | None = None
    resume: bool = False
    stochastic_depth: bool = False
    data: str | None = None
    progress_eval: bool = True
    fused_kernels: bool = True
    sync_bn: bool = False


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context the forward passes run in: ``torch.autocast`` to
    ``DTYPES[precision]`` on ``device``'s type, or a null context for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=DTYPES[precision])
