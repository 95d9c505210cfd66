"""Test accuracy of a training module, plain and with test-time augmentation.

The test-time augmentation is the ``tta_flip`` pass applied to the evaluated module (the
graph evaluates the images and their mirror and averages the logits), so what is measured
here is what ``fastgraph export`` folds into an engine. :class:`Evaluator` holds the
test images (on the device, or streamed from disk) and the TTA module, refreshed with the
current weights instead of rebuilt at every evaluation; its :meth:`Evaluator.warm_up`
evaluates every batch shape the timed evaluations see, so that they compile and autotune nothing.

What a model must return to be trained or exported (one logits tensor,
:func:`check_logits`), what it must have to be trained (:func:`check_trainable`), and the
loss of a timed training step of any output (:func:`training_loss`, for ``fastgraph
optimize`` and ``fastgraph profile``) live here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from fastgraph.core import nvtx
from fastgraph.core.errors import ModelError, UserError


def describe_output(out) -> str:
    """What a model returned, in words: "a tensor of shape (4, 10)", "a tuple of 2
    tensors", "a dict with keys 'logits', 'features'", "a str"."""
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    kind = type(out).__name__
    if isinstance(out, dict):
        return f"a {kind} with keys {', '.join(map(repr, out))}" if out else f"an empty {kind}"
    if isinstance(out, (tuple, list)):
        items = "tensors" if all(isinstance(v, torch.Tensor) for v in out) else "items"
        return f"a {kind} of {len(out)} {items if len(out) != 1 else items[:-1]}"
    return f"a {kind}"


def check_logits(out, images: int, command: str) -> torch.Tensor:
    """``out`` (a model's output on ``images`` images) when it is what ``command`` (e.g.
    "fastgraph train") needs: one float tensor of logits, (images, classes).

    Raises:
        ModelError: ``out`` is something else (a tuple or dict of outputs, a feature
            map...): one line saying what it is.
    """
    if (isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() == 2
            and len(out) == images):
        return out
    hint = ": make forward return the logits alone" if isinstance(out, (tuple, list, dict)) else ""
    raise ModelError(f"{command} needs a model whose forward returns one tensor of logits, (N, "
                     f"num_classes) for N images; on {images} images it returned "
                     f"{describe_output(out)}{hint}")


def check_trainable(model: nn.Module, name: str, consequence: str) -> None:
    """Raise ``ModelError`` ("<name>: the model has no trainable parameters, so
    <consequence>") unless a parameter of ``model`` requires grad: a training step of a
    model without one has no weight to update (fixed weights held as buffers, or every
    parameter frozen)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"{name}: the model has no trainable parameters, so {consequence}")


def training_loss(out, y: torch.Tensor, top: int | None = None) -> torch.Tensor:
    """A scalar loss of a model output for a timed training step (``fastgraph optimize``
    and ``fastgraph profile``).

    ``out`` is a tensor or a tuple, list or dict of them (nested). Its first floating
    tensor gets cross-entropy against the int64 labels ``y`` (N,) when it is (N, classes)
    logits that the labels fit, else its mean; every further floating tensor adds its
    mean, so the backward reaches every head the model computes, as training would.
    ``top``: the largest label there can be (default ``y``'s, read back from its device).

    Raises:
        UserError: the output holds no floating-point tensor (nothing to train).
    """
    tensors = [t.float() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        raise UserError(f"the model returns no floating-point tensor ({type(out).__name__}): "
                        "nothing to train")
    first = tensors[0]
    top = int(y.max()) if top is None else top
    fits = first.dim() == 2 and first.shape[0] == len(y) and first.shape[1] > top
    loss = F.cross_entropy(first, y) if fits else first.mean()
    return loss + sum(t.mean() for t in tensors[1:])


class TensorBatches:
    """Test images resident on the device, in batches: uint8 (b, 3, H, W) and int64 (b,)
    slices of ``images`` (N, 3, H, W) and ``labels`` (N,), the last batch smaller. Re-iterable;
    ``len`` is N (what :class:`fastgraph.data.imagenet_stream.TestStream` gives for streamed images)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.labels), self.batch_size):
            yield self.images[i:i + self.batch_size], self.labels[i:i + self.batch_size]


@torch.no_grad()
def evaluate(module: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             mean: torch.Tensor, std: torch.Tensor, autocast, channels_last: bool) -> float:
    """Top-1 accuracy (fraction) of ``module`` in eval mode over ``batches`` of uint8
    (b, 3, H, W) images and int64 (b,) labels on one device.

    ``mean``/``std``: float32 (1, 3, 1, 1) on the images' device, 0..255 units;
    ``autocast``: a context-manager factory (``torch.autocast`` or a null one).

    Raises:
        ValueError: ``batches`` is empty.
    """
    module.eval()
    correct, seen = None, 0
    with nvtx.range("evaluation"):
        for images, labels in batches:
            x = (images.float() - mean) / std
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = module(x)
            right = (logits.argmax(1) == labels).sum()
            correct = right if correct is None else correct + right
            seen += len(labels)
    if not seen:
        raise ValueError("no test images to evaluate")
    return correct.item() / seen


class FlipTTA:
    """The ``tta_flip`` pass at ``level`` (the recipe's ``[eval] tta_level``), kept per module.

    The pass copies the module it is given; the copy is kept and refreshed with
    ``load_state_dict`` (a device copy) on later calls for the same module, instead of
    rebuilt every time.
    """

    def __init__(self, level: int):
        self.level = level
        self._cached: tuple[nn.Module, nn.Module] | None = None

    def __call__(self, module: nn.Module) -> nn.Module:
        """``module`` with the tta_flip pass applied, holding ``module``'s current weights."""
        from fastgraph import passes

        cached = self._cached
        if cached is not None and cached[0] is module:
            state = module.state_dict()
            if cached[1].state_dict().keys() == state.keys():
                cached[1].load_state_dict(state)
                return cached[1]
        tta = passes.get("tta_flip").fn(module, level=self.level)
        self._cached = (module, tta)
        return tta


class Evaluator:
    """Accuracy on the test images, plain or with the recipe's TTA.

    Args:
        batches: the test images, re-iterable, with ``len`` the number of images: a
            :class:`TensorBatches` of uint8 (N, 3, H, W) images and int64 (N,) labels on the
            device, or a :class:`fastgraph.data.imagenet_stream.TestStream`, in batches of
            the recipe's ``[eval] batch_size``.
        mean, std: float32 (1, 3, 1, 1) on the same device, 0..255 units.
        tta_level: the recipe's ``[eval] tta_level`` (0: no TTA; the TTA accuracy is the plain one).
        autocast: a context-manager factory (see :func:`fastgraph.training.options.autocast_for`).
        channels_last: feed channels-last batches.
    """

    def __init__(self, batches, *, mean: torch.Tensor, std: torch.Tensor, tta_level: int,
                 autocast: Callable, channels_last: bool):
        self.batches = batches
        self.tta = FlipTTA(tta_level) if tta_level else None
        self._common = {"mean": mean, "std": std, "autocast": autocast, "channels_last": channels_last}

    def accuracy(self, module: nn.Module, tta: bool) -> float:
        """Top-1 accuracy (fraction) of ``module`` on all test images, with TTA when ``tta``."""
        evaluated = self.tta(module) if tta and self.tta is not None else module
        return evaluate(evaluated, self.batches, **self._common)

    def warm_up(self, module: nn.Module) -> None:
        """Evaluate ``module`` (and its TTA form) on a full test batch and one of the last,
        smaller batch's size: every shape the timed evaluations see, so that they compile nothing."""
        images, labels = next(iter(self.batches))
        shapes = [(images, labels)]
        rest = len(self.batches) % len(labels)
        if rest and len(self.batches) > len(labels):
            shapes.append((images[:rest], labels[:rest]))
        modules = [module, self.tta(module)] if self.tta is not None else [module]
        for m in modules:
            evaluate(m, shapes, **self._common)
