"""Where the kernels may run: under ``TRITON_INTERPRET=1`` CPU tensors reach the interpreter and
CUDA tensors never do (they take the PyTorch references).

Without a CUDA device, torch's FakeTensorMode makes real ``cuda``-device tensors (metadata, no
storage) on which the guard and the launchers are checked; the references themselves need a
real device for CUDA tensors, so the public path is checked on one (``gpu`` mark).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastgraph.data import CIFAR10_MEAN, CIFAR10_STD
from fastgraph.kernels import _triton
from fastgraph.kernels.augment import _launch_augment
from fastgraph.kernels.bn_act import _forward_triton

pytestmark = pytest.mark.kernels


def test_interpreter_takes_cpu_tensors_only():
    with FakeTensorMode():
        fake_cuda = torch.empty(2, 3, device="cuda")
    assert fake_cuda.device.type == "cuda"
    assert _triton.can_launch(torch.empty(2, 3))
    assert not _triton.can_launch(fake_cuda)
    assert not _triton.can_launch(torch.empty(2, 3, device="meta"))
    with pytest.raises(RuntimeError, match="got a cuda tensor, interpreter on"):
        _triton.require_launchable(fake_cuda, "augment")


def test_launchers_refuse_cuda_tensors_under_the_interpreter():
    with FakeTensorMode():
        images = torch.empty(10, 3, 8, 8, dtype=torch.uint8, device="cuda")
        index = torch.arange(4, device="cuda")
        shift, cutout = (torch.zeros(4, 2, dtype=torch.int64, device="cuda") for _ in range(2))
        flip = torch.zeros(4, dtype=torch.bool, device="cuda")
        x = torch.empty(4, 8, 5, 5, device="cuda")
        with pytest.raises(RuntimeError, match="augment: .*got a cuda tensor, interpreter on"):
            _launch_augment(images, index, shift, flip, cutout, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                            pad=2, cutout_size=4)
        with pytest.raises(RuntimeError, match="bn_act: .*got a cuda tensor, interpreter on"):
            _forward_triton(x, None, None, None, None, True, 0.1, 1e-5, "celu", 1.0, 1)


@pytest.mark.gpu
def test_cuda_tensors_take_the_references_under_the_interpreter(run_on_gpu):
    run_on_gpu("""
import torch
from fastgraph.kernels import _triton
from fastgraph.kernels.augment import augment, augment_reference, draw_augmentation
from fastgraph.kernels.bn_act import bn_act, bn_act_reference
assert _triton.INTERPRET
g = torch.Generator(device="cuda").manual_seed(0)
images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, device="cuda")
index = torch.randint(0, 100, (16,), device="cuda", generator=g)
shift, flip, cutout = draw_augmentation(16, g, pad=4, cutout_size=8)
kw = dict(mean=(125.3, 123.0, 113.9), std=(63.0, 62.1, 66.7), pad=4, cutout_size=8, out_dtype=torch.bfloat16)
assert torch.equal(augment(images, index, shift, flip, cutout, **kw),
                   augment_reference(images, index, shift, flip, cutout, **kw))
x = torch.randn(8, 16, 6, 6, device="cuda")
y = bn_act(x, None, None, None, None, training=True)
assert y.device.type == "cuda"
assert torch.allclose(y, bn_act_reference(x, None, None, None, None, training=True))
""", interpret=True)
