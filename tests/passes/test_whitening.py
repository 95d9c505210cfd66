"""whitening / fuse_whitening: PCA patch whitening of the input on real CIFAR-10 patches."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastgraph.core.modules import PatchWhitening
from fastgraph.passes import get, rewrite_count
from fastgraph.passes._options import PassOptionError


@pytest.fixture
def example(example_graph):
    """``example("resnet20")``: that example file's model traced with torch.fx (train mode)."""
    return lambda name: example_graph(f"{name}.py")


class AirbenchStem(nn.Module):
    """airbench94's stem shape: a 2x2 conv without padding on the raw image."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 2, padding=0, bias=True)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(F.gelu(self.stem(x)).mean((2, 3)))


class GreyStem(nn.Module):
    def __init__(self, stride=1, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, stride=stride, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.fixture(scope="module")
def train_images(cifar10):
    from fastgraph.data import normalize

    return normalize(cifar10.train_images[:1000])


def whitening_module(gm) -> PatchWhitening:
    (module,) = [m for m in gm.modules() if isinstance(m, PatchWhitening)]
    return module


def test_whitened_patches_have_identity_second_moment(example, train_images, cifar10):
    from fastgraph.data import normalize

    gm = example("resnet20")
    out = get("whitening").fn(gm, images=train_images, eps=1e-9)
    weight = whitening_module(out).weight
    assert weight.shape == (27, 3, 3, 3)

    # On the patches it was fitted to, every whitened channel has unit second moment and
    # the channels are uncorrelated: E[y y^T] = diag(λ / (λ + eps)) ~ I.
    y = F.conv2d(train_images.double(), weight.double()).transpose(0, 1).reshape(27, -1)
    moment = y @ y.T / y.shape[1]
    torch.testing.assert_close(moment, torch.eye(27, dtype=torch.float64), atol=2e-3, rtol=0)

    # On other training images it generalises: the raw patch covariance's eigenvalues span
    # five orders of magnitude (~24 down to ~6e-5) and neighbouring pixels correlate at ~0.95;
    # whitened, the variances stay within a factor 2 of 1 and correlations below 0.15 (patches of
    # one image are far from independent samples, so the estimate is noisy).
    held_out = normalize(cifar10.train_images[1000:2000]).double()
    y = F.conv2d(held_out, weight.double()).transpose(0, 1).reshape(27, -1)
    moment = y @ y.T / y.shape[1]
    assert torch.all((moment.diagonal() > 0.5) & (moment.diagonal() < 2.0))
    std = moment.diagonal().sqrt()
    correlation = moment / std[:, None] / std[None, :]
    assert (correlation - torch.eye(27, dtype=torch.float64)).abs().max() < 0.15


def test_eigenvalues_scale_filters_by_inverse_sqrt(example, train_images):
    gm = example("resnet20")
    eps = 5e-4
    weight = whitening_module(get("whitening").fn(gm, images=train_images[:300], eps=eps)).weight.double()
    flat = weight.flatten(1)
    # Rows are orthogonal eigenvectors scaled by 1/sqrt(λ + eps), largest λ first.
    gram = flat @ flat.T
    assert torch.allclose(gram - torch.diag(gram.diagonal()), torch.zeros_like(gram), atol=1e-6 * gram.max())
    lam = 1 / gram.diagonal() - eps
    assert torch.all(lam[:-1] >= lam[1:] - 1e-9)
    assert lam[0] > 10  # the mean-intensity direction of normalised 3x3 patches (27 values ~1 each)


def test_graph_structure_buffer_and_preserved_function(example, frozen, train_images, real_batch):
    x, _ = real_batch
    gm = example("resnet20")
    untouched = frozen(gm)
    out = get("whitening").fn(gm, images=train_images[:300], pointwise_init="reproduce")
    untouched()
    assert rewrite_count(gm, out) == 1

    nodes = [n for n in out.graph.nodes]
    assert [n.target for n in nodes[:4]] == ["x", "whitening", "conv1", "bn1"]
    pointwise = out.get_submodule("conv1")
    assert pointwise.kernel_size == (1, 1) and pointwise.in_channels == 27 and pointwise.out_channels == 16
    white = whitening_module(out)
    assert white.padding == (1, 1, 1, 1)
    # Fixed: a buffer, so optimisers (which take parameters) never see it.
    assert "whitening.weight" in dict(out.named_buffers())
    assert "whitening.weight" not in dict(out.named_parameters())
    assert out.get_submodule("conv1").weight.requires_grad

    # Same k: the 1x1 conv starts as the replaced conv in whitened coordinates.
    with torch.no_grad():
        torch.testing.assert_close(out(x[:8]), gm(x[:8]), atol=1e-5, rtol=1e-4)

    # Training moves the 1x1 conv and leaves the whitening filters alone.
    out.train()
    before = white.weight.clone()
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    F.cross_entropy(out(x[:8, :, :16, :16]), real_batch[1][:8]).backward()
    opt.step()
    assert torch.equal(white.weight, before)
    assert out.get_submodule("conv1").weight.grad is not None


@pytest.mark.parametrize(("kernel_size", "pairs", "channels"), [(3, False, 27), (2, False, 12), (2, True, 24),
                                                                 (3, True, 54)])
def test_channel_counts_and_output_size(example, train_images, real_batch, kernel_size, pairs, channels):
    x, _ = real_batch
    gm = example("preact_resnet20")
    init = "reproduce" if kernel_size == 3 else "fresh"
    out = get("whitening").fn(gm, images=train_images[:200], kernel_size=kernel_size, pairs=pairs,
                              pointwise_init=init)
    white = whitening_module(out)
    assert white.weight.shape == (channels, 3, kernel_size, kernel_size)
    assert out.get_submodule("conv1").in_channels == channels
    with torch.no_grad():
        stem = out.get_submodule("conv1")(white(x[:4]))
        assert stem.shape == gm.get_submodule("conv1")(x[:4]).shape  # (4, 16, 32, 32): size kept
        if kernel_size == 3:  # pairs or not, the same k reproduces the replaced conv
            torch.testing.assert_close(out(x[:8]), gm(x[:8]), atol=1e-5, rtol=1e-4)


def test_airbench_stem_defaults_to_2x2_and_moves_bias(train_images, real_batch):
    x, _ = real_batch
    gm = fx.symbolic_trace(AirbenchStem().eval())
    out = get("whitening").fn(gm, images=train_images[:200], pairs=True, pointwise_init="reproduce")
    white = whitening_module(out)
    assert white.weight.shape == (24, 3, 2, 2) and white.padding == (0, 0, 0, 0)
    stem = out.get_submodule("stem")
    assert stem.bias is not None and torch.equal(stem.bias, gm.get_submodule("stem").bias)
    with torch.no_grad():
        torch.testing.assert_close(out(x), gm(x), atol=1e-5, rtol=1e-4)


def test_fresh_pointwise_conv_is_initialised_as_pytorch_does(example, train_images, real_batch):
    """Page's whitening_block follows the fixed filters with a new 1x1 conv: PyTorch's
    default initialisation (kaiming-uniform, bound 1/sqrt(fan_in)), not the random stem
    seen through whitening^-1, which would undo the whitening at initialisation."""
    x, _ = real_batch
    gm = example("resnet20")
    out = get("whitening").fn(gm, images=train_images[:300])  # pointwise_init="fresh" by default
    weight = out.get_submodule("conv1").weight
    assert weight.shape == (16, 27, 1, 1)
    assert weight.abs().max() <= 1 / 27 ** 0.5 and weight.std() > 0.5 / (3 * 27) ** 0.5
    with torch.no_grad():
        assert (out(x[:8]) - gm(x[:8])).abs().max() > 1e-3  # a different network at initialisation
    with pytest.raises(PassOptionError, match="needs kernel_size == 3"):
        get("whitening").fn(gm, images=train_images[:50], kernel_size=2, pointwise_init="reproduce")


def test_airbench_form_the_stem_becomes_the_frozen_whitening_conv(train_images, real_batch):
    """airbench94's init_whitening_conv: the 2x2 first conv's weight *is* the +/- pair of
    scaled eigenvector filters, frozen; its bias stays and trains for whiten_bias_epochs."""
    x, y = real_batch
    gm = fx.symbolic_trace(AirbenchStem())
    out = get("whitening").fn(gm, images=train_images[:300], pairs=True, into="stem", bias_epochs=3)
    assert rewrite_count(gm, out) == 1
    assert not any(isinstance(m, PatchWhitening) for m in out.modules())
    assert [n.target for n in out.graph.nodes] == [n.target for n in gm.graph.nodes]  # same graph
    stem = out.get_submodule("stem")
    reference = get("whitening").fn(gm, images=train_images[:300], pairs=True, pointwise_init="reproduce")
    torch.testing.assert_close(stem.weight, whitening_module(reference).weight, rtol=0, atol=0)
    assert torch.equal(stem.weight[:12], -stem.weight[12:])  # each filter with its negation
    assert not stem.weight.requires_grad and stem.bias.requires_grad
    assert torch.equal(stem.bias, gm.get_submodule("stem").bias)
    hints = out.meta["fastgraph.param_hints"]
    assert hints["stem.weight"] == {"trainable": False}
    assert hints["stem.bias"] == {"lr_scale": 1.0, "weight_decay_scale": 1.0, "train_epochs": 3.0,
                                  "own_schedule": False}
    assert "stem.weight" not in gm.meta.get("fastgraph.param_hints", {})  # the input is untouched

    # The identity configuration keeps the stem's own filters: the same function.
    same = get("whitening").fn(gm, images=train_images[:300], pairs=True, into="stem", filters="keep")
    with torch.no_grad():
        torch.testing.assert_close(same(x), gm(x), rtol=0, atol=0)
    assert get("whitening").fn(out, images=train_images[:50], pairs=True, into="stem") is out  # done once


def test_airbench_form_refuses_a_stem_of_another_width(example, train_images):
    with pytest.raises(PassOptionError, match="needs a first conv with 54 output channels"):
        get("whitening").fn(example("resnet20"), images=train_images[:50], pairs=True, into="stem")
    with pytest.raises(PassOptionError, match="kernel_size=2 would change its shape"):
        get("whitening").fn(example("resnet20"), images=train_images[:50], kernel_size=2, into="stem")
    with pytest.raises(PassOptionError, match="into must be"):
        get("whitening").fn(example("resnet20"), images=train_images[:50], into="first")


def test_does_not_fire_without_a_whitenable_rgb_conv(example, frozen, train_images):
    for gm in (fx.symbolic_trace(GreyStem()), fx.symbolic_trace(GreyStem(stride=2, in_channels=3))):
        untouched = frozen(gm)
        assert get("whitening").fn(gm, images=train_images[:100]) is gm
        untouched()
    once = get("whitening").fn(example("resnet20"), images=train_images[:100])
    assert get("whitening").fn(once, images=train_images[:100]) is once  # already whitened


def test_rejects_bad_options(example, train_images):
    gm = example("resnet20")
    with pytest.raises(PassOptionError, match="images"):
        get("whitening").fn(gm, images=train_images[:10, :1])
    with pytest.raises(PassOptionError, match="eps"):
        get("whitening").fn(gm, images=train_images[:10], eps=0.0)
    airbench = fx.symbolic_trace(AirbenchStem())
    with pytest.raises(PassOptionError, match="kernel_size=1 cannot keep the output size"):
        get("whitening").fn(airbench, images=train_images[:10], kernel_size=1)


@pytest.mark.parametrize(("kernel_size", "pairs"), [(3, False), (2, True)])
def test_fuse_whitening_equals_unfused_in_float64(example, frozen, train_images, real_batch, kernel_size,
                                                  pairs):
    x, _ = real_batch
    white = get("whitening").fn(example("resnet20").eval(), images=train_images[:200],
                                kernel_size=kernel_size, pairs=pairs)
    with torch.no_grad():  # as after training: the 1x1 conv is no longer the initial one
        white.get_submodule("conv1").weight.normal_()
    white = white.double()
    untouched = frozen(white)
    fused = get("fuse_whitening").fn(white)
    untouched()
    assert rewrite_count(white, fused) == 1
    assert not any(isinstance(m, PatchWhitening) for m in fused.modules())
    conv = fused.get_submodule("conv1")
    assert conv.weight.shape == (16, 3, kernel_size, kernel_size) and conv.weight.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(fused(x[:8].double()), white(x[:8].double()), atol=1e-10, rtol=1e-10)


def test_fuse_whitening_negative_cases(example, train_images):
    plain = example("resnet20")
    assert get("fuse_whitening").fn(plain) is plain

    # The whitened image also feeds a second consumer: folding would lose it.
    white = get("whitening").fn(example("resnet20"), images=train_images[:200])
    node = next(n for n in white.graph.nodes if n.target == "whitening")
    output = next(n for n in white.graph.nodes if n.op == "output")
    with white.graph.inserting_before(output):
        extra = white.graph.call_method("mean", args=(node,))
    output.args = ((output.args[0], extra),)
    white.recompile()
    assert get("fuse_whitening").fn(white) is white
