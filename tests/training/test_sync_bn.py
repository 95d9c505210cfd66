"""SyncBatchNorm for data-parallel training (``--sync-bn``): the conversion keeps the traced
model's function (outputs, gradients, running statistics) where no statistics are shared,
refuses ghost batch norm, and is refused where torch cannot run it (CPU, one process)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastgraph.core.errors import UserError
from fastgraph.core.modules import GhostBatchNorm
from fastgraph.core.tracing import trace
from fastgraph.training.distributed import sync_batchnorm
from support import EXAMPLES, build_example, cli_error


def _real_batch(data_path, n=16):
    from fastgraph.data import load_cifar10, normalize

    ds = load_cifar10(data_path)
    rows = torch.arange(0, 50_000, 50_000 // n)[:n]  # every class: the archive is class-sorted
    return normalize(ds.train_images[rows]), ds.train_labels[rows]


def test_every_batchnorm_of_a_traced_model_becomes_syncbatchnorm_and_computes_the_same(data_path):
    torch.manual_seed(0)
    gm = trace(build_example("resnet20.py"), mode="train")
    reference = copy.deepcopy(gm)
    bn_names = [n for n, m in gm.named_modules() if isinstance(m, nn.BatchNorm2d)]
    converted = sync_batchnorm(gm)
    synced = [n for n, m in converted.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    assert synced == bn_names and len(synced) == 19
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())

    x, y = _real_batch(data_path)
    # No process group: SyncBatchNorm falls back to the local batch, so both sides must agree exactly.
    losses = [nn.functional.cross_entropy(m(x), y) for m in (reference, converted)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(reference.named_parameters(), converted.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    for (name, b), c in zip(reference.named_buffers(), converted.buffers(), strict=True):
        assert torch.equal(b, c), name


def test_ghost_batchnorm_is_refused_not_silently_synchronised():
    gm = trace(build_example("resnet20.py"), mode="train")
    from fastgraph import passes

    ghost = passes.get("ghost_batchnorm").fn(gm, ghost_batch_size=8)
    assert any(isinstance(m, GhostBatchNorm) for m in ghost.modules())
    with pytest.raises(UserError, match="ghost batch"):
        sync_batchnorm(ghost)


def test_sync_bn_outside_a_gpu_data_parallel_training_is_one_line(capsys, tmp_path):
    line = cli_error(capsys, "train", str(EXAMPLES / "resnet20.py"), "--recipe", "resnet20_seed_baseline",
                     "--device", "cpu", "--sync-bn", "--epochs", "1")
    assert "--sync-bn" in line and "CUDA" in line
