"""Logits of a module or an engine over many images, in batches: what the export's
verification runs on the reference module and on the engine. Its own module so that the
ONNX and TensorRT runners use it without importing the export pipeline.
"""

from __future__ import annotations

import torch
from torch import nn

REFERENCE_CHUNK = 500  # images per PyTorch / ONNX Runtime call while verifying


def run_in_batches(call, images: torch.Tensor, *, batch: int | None, chunk: int = REFERENCE_CHUNK,
                   description: str = "engine") -> torch.Tensor:
    """Logits of an engine over ``images``, float32 (N, classes) on the CPU.

    ``call`` maps a float32 (n, 3, H, W) CPU batch to its logits (any float tensor on any
    device). A fixed-batch engine (``batch`` given) gets chunks of exactly ``batch``
    images, the last padded with copies of its first image and the padding's outputs
    dropped; a dynamic one gets chunks of ``chunk``. A transient progress bar in images,
    named ``description``, shows on a terminal only (see :func:`fastgraph.core.console.progress`).

    Raises:
        ModelError: ``call`` returned something other than one (n, classes) float tensor
            (a model that returns a tuple or dict of outputs): one line saying what.
    """
    from fastgraph.core.console import progress
    from fastgraph.training.evaluation import check_logits

    size = batch or chunk
    outputs = []
    with progress(f"verifying: {description}", total=len(images)) as update:
        for start in range(0, len(images), size):
            x = images[start:start + size]
            n = len(x)
            if batch and n < batch:
                x = torch.cat([x, x[:1].expand(batch - n, *x.shape[1:])])
            outputs.append(check_logits(call(x), len(x), "fastgraph export")[:n].float().cpu())
            update(advance=n)
    return torch.cat(outputs)


@torch.no_grad()
def pytorch_logits(module: nn.Module, images: torch.Tensor, device: torch.device,
                   chunk: int = REFERENCE_CHUNK) -> torch.Tensor:
    """float32 (N, classes) CPU logits of ``module`` (eval) on float32 (N, 3, H, W) ``images``.

    Runs on ``device`` (``module`` is moved there) in chunks of ``chunk`` images, in IEEE
    float32: TF32 is off for the call, since PyTorch's cuDNN convolutions round to it by
    default on Ampere and later GPUs (about 1e-3 relative, far above an fp32 engine's
    tolerance), and a reference must not be the looser of the two.
    """
    module = module.to(device).eval()
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return run_in_batches(lambda x: module(x.to(device)), images, batch=None, chunk=chunk,
                              description="PyTorch reference")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


@torch.no_grad()
def run_engine(engine: nn.Module, images: torch.Tensor, batch: int | None, device: torch.device,
                chunk: int = REFERENCE_CHUNK) -> torch.Tensor:
    """Logits of a PyTorch-callable engine (see :func:`run_in_batches`)."""
    return run_in_batches(lambda x: engine(x.to(device)), images, batch=batch, chunk=chunk)
