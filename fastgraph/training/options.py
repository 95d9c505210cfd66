"""What a training is asked to do: :class:`TrainOptions`, the precisions it runs in, the
timing rule its records state, and the error a diverging run raises."""

from __future__ import annotations

import contextlib
import math
import numbers
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
MAX_SEED = 2**64 - 1  # the largest seed torch.manual_seed accepts (an unsigned 64-bit integer)


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

    Raises:
        UserError: on construction, a field of the wrong type (``epochs="2"``,
            ``batch_size=2.5``, ``resume="no"``), a seed outside [0, 2**64 - 1] or one that
            ``runs`` pushes past it, ``runs``, ``subset`` or ``test_subset`` below 1, or a
            ``target`` outside (0, 1]. The ranges of ``epochs``, ``batch_size`` and
            ``precision``, which the recipe may also give, are checked by the trainer.
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

    def __post_init__(self) -> None:
        # The one place the command line and the Python API both go through: argparse has
        # parsed the command's values already, a Python caller's are checked only here.
        for name in ("runs", "seed", "batch_size", "subset", "test_subset"):
            value = getattr(self, name)
            if value is None and name not in ("runs", "seed"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise UserError(f"{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))  # a NumPy integer too, for the JSON record
        for name in ("epochs", "target"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise UserError(f"{name} must be a number, got {value!r}")
        for name in ("resume", "stochastic_depth", "progress_eval", "fused_kernels", "sync_bn", "compile"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "compile" and value is None):
                raise UserError(f"{name} must be True or False, got {value!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"seed must be an integer in [0, 2**64 - 1] (what torch.manual_seed takes), "
                            f"got {self.seed}")
        for name in ("runs", "subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        if self.seed + self.runs - 1 > MAX_SEED:  # run i is seeded with seed + i
            raise UserError(f"seed {self.seed} with runs {self.runs}: the last run's seed "
                            f"{self.seed + self.runs - 1} is above 2**64 - 1, the largest torch accepts")
        if self.target is not None and not (math.isfinite(self.target) and 0 < self.target <= 1):
            raise UserError(f"target must be an accuracy in (0, 1] (a fraction: 0.94 for 94%), "
                            f"got {self.target}")


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context the forward passes run in: ``torch.autocast`` to
    ``DTYPES[precision]`` on ``device``'s type, or a null context for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=DTYPES[precision])
