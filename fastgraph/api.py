"""Thin wrappers of the public API where a room's own function takes another shape.

:func:`train` takes a model file or a function building the model, a recipe by name, and
the trainer's options as keywords, and runs :func:`fastgraph.training.loop.train`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from torch import nn

from fastgraph.core.errors import UserError
from fastgraph.training.loop import TrainOptions, TrainResult
from fastgraph.training.loop import train as run_training
from fastgraph.training.recipes import Recipe, load_recipe


def train(model: str | os.PathLike | Callable[[], nn.Module], recipe: str | os.PathLike | Recipe = "fast",
          data: str | os.PathLike | None = None, runs: int = 1, *, reporter=None, **options) -> TrainResult:
    """Train ``model`` with ``recipe`` for ``runs`` independent runs, as ``fastgraph train`` does.

    The model is traced, rewritten by the recipe's passes (each checked in float64),
    trained on CIFAR-10 resident on the device as uint8 (augmented per epoch), or on an
    ImageNet-format folder streamed from disk for a recipe with ``[data] format =
    "imagefolder"``, and evaluated plain and with TTA; see :mod:`fastgraph.training.loop` for what the
    counted time includes.

    Args:
        model: a plain PyTorch model file (``entry=`` names its entry point), or a
            zero-argument function returning a fresh ``nn.Module`` (airbench's
            ``make_net``), called by every run after seeding it. Not a module instance:
            each run needs its own fresh weights. An entry or function with a
            ``num_classes`` parameter is given the data's class count.
        recipe: a shipped recipe (``fast``, ``fast_muon``, ``page2019``,
            ``resnet20_seed_baseline``, ``resnet20_seed_4gpu``, ``resnet20_seed_best``,
            ``resnet50_lars``, ``resnet50_ffcv16``), a ``.toml`` file, or a loaded
            :class:`~fastgraph.training.recipes.Recipe`.
        data: CIFAR-10 (default ``$FASTGRAPH_DATA``, then ``~/.cache/fastgraph/cifar10``),
            or the ImageNet-format root a streaming recipe reads (required for those).
        runs: independent runs (seeds ``seed, seed + 1, ...``).
        reporter: a :class:`fastgraph.training.loop.Reporter` receiving progress
            callbacks (default: none; ``fastgraph.training.report.RichReporter`` draws
            the command's table).
        options: any other :class:`~fastgraph.training.loop.TrainOptions` field:
            ``epochs``, ``batch_size``, ``seed``, ``target`` (TTA accuracy, a fraction),
            ``subset`` and ``test_subset`` (class-balanced image counts, for quick
            checks), ``device``, ``precision``, ``compile``, ``checkpoint_dir``, ``resume``,
            ``stochastic_depth``, ``progress_eval``, ``entry``...

    Returns:
        :class:`~fastgraph.training.loop.TrainResult`: every run's per-epoch records, final
        plain and TTA accuracy (fractions) and counted seconds; ``summary()`` gives mean
        and std over runs, ``to_dict()`` the record ``fastgraph train --json`` writes
        (without its provenance header), ``model`` the evaluated module of the last run.

    Raises:
        UserError: an unknown option, or one of the wrong type or out of range (see
            :class:`~fastgraph.training.options.TrainOptions`: e.g. a seed outside
            [0, 2**64 - 1]), a module instance as ``model`` or a function returning a module
            it returned before, a bad recipe, model file, data or checkpoint (one line).
        ModelError: (a ``UserError``) the model function raised (its exception and line
            in one line) or returned something other than an ``nn.Module``.
        TrainingDiverged: a NaN or infinite loss.
        fastgraph.training.loop.Interrupted: Ctrl-C or SIGTERM (a checkpoint is written
            first when ``checkpoint_dir`` is set).
    """
    if isinstance(model, nn.Module):
        raise UserError(f"train needs a fresh model for every run: give a function that builds it "
                        f"(e.g. lambda: {type(model).__name__}()) or the model file, not a module instance")
    given_here = {"model", "model_path", "recipe", "data", "runs"}
    known = {f.name for f in dataclasses.fields(TrainOptions)} - given_here
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(str(recipe))
    source = {"model_path": str(model)} if isinstance(model, (str, os.PathLike)) else {"model": model}
    opts = TrainOptions(**source, recipe=recipe, data=None if data is None else str(data), runs=runs,
                        **options)
    return run_training(opts, reporter)

