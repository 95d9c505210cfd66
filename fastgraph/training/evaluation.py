"""Test accuracy of a training module, plain and with test-time augmentation.

The test-time augmentation is the ``tta_flip`` pass applied to the evaluated module (the
graph evaluates the images and their mirror and averages the logits), so what is measured
here is what ``fastgraph export`` folds into an engine. :class:`Evaluator` holds the
test images on the device and the TTA module, refreshed with the current weights instead
of rebuilt at every evaluation; its :meth:`Evaluator.warm_up` evaluates every batch shape
the timed evaluations see, so that they compile and autotune nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastgraph.core import nvtx


@torch.no_grad()
def evaluate(module: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
             mean: torch.Tensor, std: torch.Tensor, autocast, channels_last: bool) -> float:
    """Top-1 accuracy (fraction) of ``module`` in eval mode on uint8 (N, 3, H, W) ``images``.

    ``mean``/``std``: float32 (1, 3, 1, 1) on the images' device, 0..255 units;
    ``autocast``: a context-manager factory (``torch.autocast`` or a null one).
    """
    module.eval()
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    with nvtx.range("evaluation"):
        for i in range(0, len(images), batch_size):
            x = (images[i:i + batch_size].float() - mean) / std
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = module(x)
            correct += (logits.argmax(1) == labels[i:i + batch_size]).sum()
    return correct.item() / len(images)


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
        images, labels: uint8 (N, 3, H, W) and int64 (N,) test images and labels on the device.
        mean, std: float32 (1, 3, 1, 1) on the same device, 0..255 units.
        batch_size: the recipe's ``[eval] batch_size``.
        tta_level: the recipe's ``[eval] tta_level`` (0: no TTA; the TTA accuracy is the plain one).
        autocast: a context-manager factory (see :func:`fastgraph.training.options.autocast_for`).
        channels_last: feed channels-last batches.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, mean: torch.Tensor, std: torch.Tensor,
                 batch_size: int, tta_level: int, autocast: Callable, channels_last: bool):
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.tta = FlipTTA(tta_level) if tta_level else None
        self._common = {"mean": mean, "std": std, "autocast": autocast, "channels_last": channels_last}

    def accuracy(self, module: nn.Module, tta: bool) -> float:
        """Top-1 accuracy (fraction) of ``module`` on all test images, with TTA when ``tta``."""
        evaluated = self.tta(module) if tta and self.tta is not None else module
        return evaluate(evaluated, self.images, self.labels, batch_size=self.batch_size, **self._common)

    def warm_up(self, module: nn.Module) -> None:
        """Evaluate ``module`` (and its TTA form) on a full test batch and the last, smaller
        one: every shape the timed evaluations see, so that they compile nothing."""
        n, bs = len(self.images), self.batch_size
        k = n if n <= bs else bs + n % bs
        images, labels = self.images[:k], self.labels[:k]
        modules = [module, self.tta(module)] if self.tta is not None else [module]
        for m in modules:
            evaluate(m, images, labels, batch_size=bs, **self._common)
