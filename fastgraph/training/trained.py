"""Trained weights for a traced model: a plain ``state_dict`` file or a training checkpoint.

``fastgraph export`` and ``fastgraph profile`` take the model file the user wrote plus,
optionally, weights:

- a plain ``state_dict`` (``torch.save(model.state_dict(), path)``, also the
  ``{"state_dict": ...}`` wrapper), loaded into the traced model as it is;
- a ``fastgraph train --checkpoint DIR`` checkpoint (``DIR`` or ``DIR/checkpoint.pt``,
  see :mod:`fastgraph.training.checkpoint`): its ``model`` (or ``ema``) state belongs to the
  *training* graph, the traced model rewritten by the recipe's passes (whitening adds a
  fixed conv, fused kernels rename modules...). :func:`training_graph` rebuilds that
  graph from the recorded recipe the way the trainer does (same passes, same options,
  BatchNorm momentum/eps set from the recipe) before the weights are loaded. Data
  passes (whitening) are given a few real training images only so that they build
  the same modules; every value they compute from them is then overwritten by the
  checkpoint.

Every mismatch is a one-line :class:`~fastgraph.core.errors.UserError` naming the file, the
first key that differs and both shapes.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from fastgraph.core.errors import UserError

REBUILD_IMAGES = 256  # training images given to data passes while rebuilding (values then overwritten)
# Passes that only move work onto fastgraph's fused kernels: exact (the same function), so
# a run without them (``fused_kernels=False``, ``fastgraph train --no-fused-kernels``)
# trains the same model on unfused PyTorch ops, the A side of a kernel A/B comparison.
FUSED_KERNEL_PASSES = frozenset({"fuse_bn_activation"})


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def read_weights(path: str | Path) -> tuple[dict, Path]:
    """Read a weights file (a folder means ``<folder>/checkpoint.pt``); tensors land on the CPU.

    Returns:
        (the loaded dict, the file read): a training checkpoint holding at least its
        weights and recipe, or a state_dict (names -> tensors, or ``{"state_dict": ...}``).

    Raises:
        UserError: the file is missing, unreadable, not a PyTorch file, truncated, holds
            something other than a dict, is a training checkpoint missing a key (named),
            or a dict that is neither.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        from fastgraph.training.checkpoint import checkpoint_path

        path = checkpoint_path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses pickled objects other than tensors and containers; torch's
        # own message would suggest weights_only=False, which runs arbitrary code.
        raise UserError(f"cannot read checkpoint {path}: not a PyTorch file of tensors (a state_dict "
                        "or a fastgraph training checkpoint)") from None
    except Exception as exc:  # truncated, not a torch file at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first}"[:400]) from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict or a "
                        "fastgraph training checkpoint")
    # Checked here, where export reads the file before the data, not when the weights load.
    if _meant_as_training_checkpoint(state):
        from fastgraph.training.checkpoint import WEIGHTS_KEYS, check_state

        check_state(state, path, WEIGHTS_KEYS)
    else:
        _plain_state_dict(state, path)
    return state, path


def _meant_as_training_checkpoint(state: Mapping) -> bool:
    # A state_dict maps names to tensors; these keys with other values belong to a checkpoint.
    keys = [key for key in ("format", "recipe", "model") if key in state]
    return any(not isinstance(state[key], torch.Tensor) for key in keys)


def is_training_checkpoint(state: Mapping) -> bool:
    """Whether ``state`` is a ``fastgraph train`` checkpoint (format, recipe, model state)."""
    from fastgraph.training.checkpoint import FORMAT

    return state.get("format") == FORMAT and isinstance(state.get("model"), Mapping) and "recipe" in state


def _plain_state_dict(state: Mapping, path: Path) -> Mapping[str, torch.Tensor]:
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    bad = next((k for k, v in state.items()
                if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None or not state:
        raise UserError(f"checkpoint {path} is neither a state_dict (names -> tensors) nor a fastgraph "
                        f"training checkpoint" + (f" (entry {bad!r} is not a tensor)" if bad else " (empty)"))
    return state


def check_state_matches(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise ``UserError`` naming the first key (in the model's order) that is missing from
    ``state`` or has another shape there, then the first key ``state`` has and the model lacks."""
    expected = module.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise UserError(f"checkpoint {path} does not match the model: it has no {key!r} "
                            f"(model shape {_shape(value)})")
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(f"checkpoint {path} does not match the model: {key!r} has shape "
                            f"{_shape(state[key])} in the checkpoint and {_shape(value)} in the model")
    extra = next((k for k in state if k not in expected), None)
    if extra is not None:
        raise UserError(f"checkpoint {path} does not match the model: its {extra!r} "
                        f"(shape {_shape(state[extra])}) is not in the model")


def spread_training_images(data, n: int = REBUILD_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training images of ``data`` (a loaded CIFAR-10) spread over the whole training
    set, so every class is there: float32 (n, 3, 32, 32) normalised, and int64 (n,) labels."""
    from fastgraph.data import normalize, spread_indices

    rows = spread_indices(n, len(data.train_images))
    return normalize(data.train_images[rows]), data.train_labels[rows]


def set_batchnorm(gm: nn.Module, settings: Mapping) -> None:
    """Set a recipe's ``[batchnorm]`` settings in place on every BatchNorm of ``gm``, the fused
    ``BatchNormActivation`` included (it keeps BatchNorm's settings under the same names).

    Args:
        gm: any module; its BatchNorm layers are modified.
        settings: ``{"momentum": float | None, "eps": float | None}`` (PyTorch's momentum
            convention, eps added to the variance); ``None`` or absent keeps the module's.
    """
    from fastgraph.kernels.bn_act import BatchNormActivation

    for m in gm.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchNormActivation)):
            if settings.get("momentum") is not None:
                m.momentum = settings["momentum"]
            if settings.get("eps") is not None:
                m.eps = settings["eps"]


def training_graph(gm: fx.GraphModule, recipe: Mapping, *, stochastic_depth: bool = False,
                   images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                   checks: bool = True, fused_kernels: bool = True) -> tuple[fx.GraphModule, dict]:
    """The graph ``fastgraph train`` trains: ``gm`` rewritten by the recipe's passes.

    The trainer builds its model with this function, and export and profile rebuild a
    checkpoint's graph with it, so the three always agree.

    Args:
        gm: the traced model file (not modified).
        recipe: ``Recipe.to_dict()``, as a checkpoint records it (``passes``: list of
            ``{"name", **options}``; ``batchnorm``: momentum and eps; ``stochastic_depth``).
        stochastic_depth: add the ``stochastic_depth`` pass with the recipe's options.
        images: float32 (N, 3, 32, 32) normalised training images of every class, for
            passes that need data (an integer ``images`` option takes that many, spread
            over the N) and, with ``labels`` (int64 (N,)), a 32-image batch spread over
            them that verifies exact passes.
        checks: run the pass manager's float64 checks (see ``run_passes``); the trainer
            checks once and then rebuilds without them inside its timed phase.
        fused_kernels: keep the recipe's :data:`FUSED_KERNEL_PASSES`; False drops them
            (the same function on unfused PyTorch ops).

    Returns:
        (the training-mode GraphModule with the recipe's BatchNorm settings, the pass
        manager's report as a dict).

    Raises:
        UserError: an unregistered pass, one listed twice with different options, data
            needed and not given, or a pass the pass manager refused (an exact pass
            that changed the function, a training-time pass not exact in its identity
            configuration, or one that dropped nodes it did not declare).
    """
    from fastgraph import passes as registry
    from fastgraph.core.pass_manager import run_passes, verification_batch
    from fastgraph.data import spread_indices

    names, options = [], {}
    for item in recipe.get("passes", []):
        name, opts = item["name"], {k: v for k, v in item.items() if k != "name"}
        if not fused_kernels and name in FUSED_KERNEL_PASSES:
            continue
        if name not in registry.REGISTRY:
            raise UserError(f"the recipe uses pass {name!r}, unknown to this fastgraph")
        if isinstance(opts.get("images"), int) and not isinstance(opts["images"], bool):
            if images is None:
                raise UserError(f"pass {name} needs CIFAR-10 training images: give --data")
            opts["images"] = images[spread_indices(opts["images"], len(images)).to(images.device)]
        if name in options and options[name] != opts:
            raise UserError(f"the recipe lists pass {name} twice with different options")
        names.append(name)
        options[name] = opts
    if stochastic_depth:
        names.append("stochastic_depth")
        options["stochastic_depth"] = dict(recipe.get("stochastic_depth", {}))
    batch = None
    if any(registry.get(n).exact or registry.get(n).identity is not None for n in names):
        if images is None or labels is None:
            raise UserError("the recipe's passes are verified on real images: give --data")
        batch = verification_batch(images, labels)
    # The recipe's BatchNorm settings before the passes, so their checks verify the function
    # that trains (airbench's eps 1e-12, not PyTorch's 1e-5); passes that build BatchNorms
    # (ghost_batchnorm, fuse_bn_activation) copy them.
    bn = recipe.get("batchnorm", {})
    if bn.get("momentum") is not None or bn.get("eps") is not None:
        gm = copy.deepcopy(gm)  # gm is not modified
        set_batchnorm(gm, bn)
    gm, report = run_passes(gm.train(), names, mode="train", batch=batch, options=options, checks=checks)
    refused = [o for o in report.outcomes if o.status == "refused"]
    if refused:  # the recipe names a network it would not build: say so instead of training another
        raise UserError(f"the recipe's pass {refused[0].name} was refused on this model: "
                        f"{refused[0].message}")
    set_batchnorm(gm, bn)  # again after the passes: every BatchNorm a pass built has them too
    return gm, report.to_dict()


def load_weights(gm: fx.GraphModule, path: str | Path, *, images: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, weights: str = "auto") -> tuple[fx.GraphModule, dict]:
    """``gm`` (or its rebuilt training graph) holding the weights in ``path``.

    Args:
        gm: the traced model file (not modified).
        path: a state_dict file, a training checkpoint file, or a ``--checkpoint`` folder.
        images, labels: real normalised training images and their labels for rebuilding
            the training graph (see :func:`training_graph`).
        weights: for a training checkpoint, ``"trained"`` (the trained module), ``"ema"``
            (the averaged one) or ``"auto"`` (the one the recipe evaluates).

    Returns:
        (GraphModule with the weights loaded, in eval mode; a JSON-ready description:
        ``kind``, ``path``, and for a checkpoint ``recipe``, ``epoch``, ``weights``, ``passes``).

    Raises:
        UserError: unreadable file, mismatching keys or shapes (first key, both shapes),
            or EMA weights asked of a checkpoint without them.
    """
    state, path = read_weights(path)
    info: dict = {"path": str(path.resolve())}
    if is_training_checkpoint(state):
        recipe = state["recipe"]
        settings = state.get("settings", {})
        chosen = weights
        if chosen == "auto":
            chosen = recipe.get("eval", {}).get("model", "trained")
        if chosen == "ema":
            if not isinstance(state.get("ema"), Mapping):
                raise UserError(f"checkpoint {path} holds no EMA weights (its recipe has [ema] disabled)")
            weights_state = {k.removeprefix("module."): v for k, v in state["ema"].items()
                             if k.startswith("module.")}
        else:
            weights_state = state["model"]
        module, _ = training_graph(copy.deepcopy(gm), recipe,
                                   stochastic_depth=bool(settings.get("stochastic_depth")), images=images,
                                   labels=labels, fused_kernels=bool(settings.get("fused_kernels", True)))
        info.update(kind="training checkpoint", recipe=recipe.get("recipe", {}).get("name"),
                    epoch=state.get("epoch"), weights=chosen,
                    passes=[p["name"] for p in recipe.get("passes", [])])
    else:
        if weights == "ema":
            raise UserError(f"--weights ema needs a fastgraph training checkpoint; {path} is a state_dict")
        weights_state = _plain_state_dict(state, path)
        module = copy.deepcopy(gm)
        info.update(kind="state_dict", weights="state_dict", passes=[])
    check_state_matches(module, weights_state, path)
    module.load_state_dict(weights_state)
    return module.eval(), info
