"""blurpool: FFCV's blur before every strided conv with >= 16 input channels, nowhere else."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastgraph.core.loading import load_model
from fastgraph.core.modules import BlurPool2d
from fastgraph.core.pass_manager import run_passes
from fastgraph.core.tracing import trace
from fastgraph.passes import declared_rewritten, get, rewrite_count
from fastgraph.passes._options import PassOptionError
from support import EXAMPLES, REPO

MODELS = REPO / "tests" / "models"


# ---------------------------------------------------------------- FFCV's formulation, transcribed
# libffcv/ffcv-imagenet train_imagenet.py: BlurPoolConv2d and create_model_and_scaler's apply_blurpool.


class FFCVBlurPoolConv2d(nn.Module):
    def __init__(self, conv):
        super().__init__()
        default_filter = torch.tensor([[[[1, 2, 1], [2, 4, 2], [1, 2, 1]]]]) / 16.0
        filt = default_filter.repeat(conv.in_channels, 1, 1, 1)
        self.conv = conv
        self.register_buffer("blur_filter", filt)

    def forward(self, x):
        blurred = F.conv2d(x, self.blur_filter, stride=1, padding=(1, 1),
                           groups=self.conv.in_channels, bias=None)
        return self.conv.forward(blurred)


def ffcv_apply_blurpool(mod: nn.Module) -> None:
    for name, child in mod.named_children():
        if isinstance(child, nn.Conv2d) and (max(child.stride) > 1 and child.in_channels >= 16):
            setattr(mod, name, FFCVBlurPoolConv2d(child))
        else:
            ffcv_apply_blurpool(child)


# ---------------------------------------------------------------- helpers


def traced(path, num_classes: int | None = 10) -> tuple[nn.Module, fx.GraphModule]:
    """The model a file builds and its train-mode trace."""
    model = load_model(str(path), num_classes=num_classes)
    return model, trace(model, mode="train")


def strided(model: nn.Module, min_channels: int = 16) -> dict[str, int]:
    """{qualified name: in_channels} of the convs FFCV's rule blurs, read from the modules."""
    return {name: m.in_channels for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and max(m.stride) > 1 and m.in_channels >= min_channels}


def blurred(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """{conv target: the BlurPool2d node it reads}; asserts every blur feeds exactly one conv."""
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), BlurPool2d):
            (conv,) = node.users
            assert conv.op == "call_module" and conv.args[0] is node
            assert isinstance(gm.get_submodule(conv.target), nn.Conv2d)
            found[conv.target] = node
    return found


def upsampled(real64, n: int = 8, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` real CIFAR-10 test images as float64, upsampled to ``size`` pixels."""
    x, y = real64(n)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False), y


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Train-mode logits, input gradient and {parameter name: gradient} of the cross-entropy."""
    model.train()
    x = x.clone().requires_grad_(True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


# ---------------------------------------------------------------- where it fires


@pytest.mark.parametrize(("file", "min_channels", "sites"), [
    ("resnet50.py", 16, 6),         # stages 2-4: the 3x3 conv2 and the 1x1 downsample of each first block
    ("resnet50.py", 256, 5),        # layer2.0.conv2 reads 128 channels
    ("preact_resnet20.py", 16, 4),  # conv1 and the 1x1 shortcut read the same pre-activation
    ("resnet20.py", 16, 2),         # option-A shortcuts: no conv
])
def test_one_blur_before_each_strided_conv_and_none_elsewhere(frozen, file, min_channels, sites):
    model, gm = traced(EXAMPLES / file)
    expected = strided(model, min_channels)
    assert len(expected) == sites
    assert "conv1" not in expected and "conv1" in dict(model.named_modules())  # the 3-channel stem
    inputs = {n.target: n.args[0].name for n in gm.graph.nodes
              if n.op == "call_module" and n.target in expected}
    unchanged = frozen(gm)
    out = get("blurpool").fn(gm, min_channels=min_channels)
    unchanged()
    found = blurred(out)
    assert found.keys() == expected.keys()
    assert rewrite_count(gm, out) == sites
    assert declared_rewritten(gm, out) == {n.name for n in gm.graph.nodes if n.target in expected}
    ffcv = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    for target, blur in found.items():
        module = out.get_submodule(blur.target)
        assert blur.args[0].name == inputs[target]  # the conv's old input, now blurred
        assert module.channels == expected[target] and module.blur_filter.shape == (expected[target], 1, 3, 3)
        assert torch.equal(module.blur_filter, ffcv.expand(expected[target], 1, 3, 3))
        assert not list(module.parameters())
    assert out.state_dict().keys() == gm.state_dict().keys()  # checkpoints load either way


def test_the_ffcv16_recipe_blurs_the_convs_ffcv_wraps():
    from fastgraph.training.recipes import load_recipe

    (options,) = [{k: v for k, v in p.items() if k != "name"}
                  for p in load_recipe("resnet50_ffcv16").to_dict()["passes"] if p["name"] == "blurpool"]
    model, gm = traced(EXAMPLES / "resnet50.py", num_classes=3)
    ffcv = copy.deepcopy(model)
    ffcv_apply_blurpool(ffcv)
    wrapped = {name for name, m in ffcv.named_modules() if isinstance(m, FFCVBlurPoolConv2d)}
    assert blurred(get("blurpool").fn(gm, **options)).keys() == wrapped and len(wrapped) == 6


def test_equals_ffcv_blurpool_on_real_images(real64):
    # Quarter-width torchvision ResNet-50 (its six strided convs read 32 to 256 channels) on
    # real CIFAR-10 images upsampled to 64x64, float64: the rewritten graph and FFCV's
    # BlurPoolConv2d model agree in outputs and gradients, in training and in eval.
    model, gm = traced(MODELS / "resnet50.py", num_classes=None)
    out = get("blurpool").fn(gm).double()
    reference = copy.deepcopy(model)
    ffcv_apply_blurpool(reference)
    reference.double()
    assert sum(isinstance(m, FFCVBlurPoolConv2d) for m in reference.modules()) == len(blurred(out)) == 6
    x, y = upsampled(real64)
    logits, dx, grads = forward_backward(out, x, y)
    logits_ffcv, dx_ffcv, grads_ffcv = forward_backward(reference, x, y)
    torch.testing.assert_close(logits, logits_ffcv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, dx_ffcv, rtol=1e-12, atol=1e-12)
    renamed = {n.replace(".conv.weight", ".weight"): g for n, g in grads_ffcv.items()}
    assert renamed.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, renamed[name], rtol=1e-12, atol=1e-12, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(x), reference.eval()(x), rtol=1e-12, atol=1e-12)


def test_functional_convolutions_are_blurred_too(real64):
    class Functional(nn.Module):  # weights read as get_attr nodes, convs as F.conv2d calls
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(16, 3, 3, 3) * 0.3)   # the stem: 3 channels
            self.w2 = nn.Parameter(torch.randn(32, 16, 3, 3) * 0.1)  # stride 2, 16 channels
            self.w3 = nn.Parameter(torch.randn(32, 8, 3, 3) * 0.1)   # stride (1, 2), groups 4: 32 channels
            self.w4 = nn.Parameter(torch.randn(8, 32, 1, 1) * 0.1)   # stride 1

        def forward(self, x):
            h = F.relu(F.conv2d(x, self.w1, None, 2, 1))
            h = F.relu(F.conv2d(h, self.w2, stride=2, padding=1))
            h = F.relu(torch.conv2d(h, self.w3, None, (1, 2), 1, 1, 4))
            return F.conv2d(h, self.w4).mean((2, 3))

    gm = fx.symbolic_trace(Functional()).double()
    out = get("blurpool").fn(gm)
    blurs = [out.get_submodule(n.target) for n in out.graph.nodes
             if n.op == "call_module" and isinstance(out.get_submodule(n.target), BlurPool2d)]
    assert [m.channels for m in blurs] == [16, 32] and rewrite_count(gm, out) == 2
    assert all(m.blur_filter.dtype == torch.float64 for m in blurs)  # the weights' dtype

    def blur(h):
        return F.conv2d(h, BlurPool2d.filter("binomial3").double().expand(h.shape[1], 1, 3, 3),
                        stride=1, padding=1, groups=h.shape[1])

    x, _ = real64(4)
    with torch.no_grad():
        h = F.relu(F.conv2d(x, gm.w1, None, 2, 1))
        h = F.relu(F.conv2d(blur(h), gm.w2, stride=2, padding=1))
        h = F.relu(F.conv2d(blur(h), gm.w3, None, (1, 2), 1, 1, 4))
        torch.testing.assert_close(out(x), F.conv2d(h, gm.w4).mean((2, 3)), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- identity configuration


def test_delta_kernel_is_the_original_function_in_training(real64):
    _, gm = traced(EXAMPLES / "preact_resnet20.py")
    gm = gm.double()
    out = get("blurpool").fn(gm, kernel="delta")
    assert len(blurred(out)) == 4
    x, y = real64(16)
    logits, dx, grads = forward_backward(copy.deepcopy(out), x, y)
    logits_ref, dx_ref, grads_ref = forward_backward(copy.deepcopy(gm), x, y)
    torch.testing.assert_close(logits, logits_ref, rtol=0, atol=0)
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_pass_manager_checks_the_identity_configuration(real_batch, mode):
    x, y = real_batch
    _, gm = traced(EXAMPLES / "resnet20.py")
    out, report = run_passes(gm, ["blurpool"], mode=mode, batch=(x[:16], y[:16]))
    outcome = report.outcomes[0]
    assert outcome.status == "applied", outcome
    assert outcome.rewrites == 2 and outcome.identity == {"kernel": "delta"}
    assert "identity configuration exact (train mode)" in outcome.message
    assert outcome.max_output_diff == 0.0 and outcome.max_grad_diff == 0.0
    assert [m.kernel for m in out.modules() if isinstance(m, BlurPool2d)] == ["binomial3"] * 2


# ---------------------------------------------------------------- where it must not fire


def test_nothing_to_blur_returns_the_input(frozen):
    _, resnet9 = traced(EXAMPLES / "resnet9.py")  # max-pools downsample; every conv has stride 1
    assert get("blurpool").fn(resnet9) is resnet9
    _, resnet50 = traced(EXAMPLES / "resnet50.py")
    unchanged = frozen(resnet50)
    assert get("blurpool").fn(resnet50, min_channels=2049) is resnet50  # above every conv's 2048
    unchanged()
    stem_only = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU()))
    assert get("blurpool").fn(stem_only) is stem_only
    once = get("blurpool").fn(resnet50)
    assert get("blurpool").fn(once) is once
    assert get("blurpool").fn(once, kernel="delta") is once  # already blurred: left alone, any filter


@pytest.mark.parametrize(("options", "message"), [
    ({"min_channels": 0}, "min_channels"),
    ({"min_channels": 1.5}, "min_channels"),
    ({"min_channels": True}, "min_channels"),
    ({"min_channels": "16"}, "min_channels"),
    ({"kernel": "gaussian5"}, "kernel"),
])
def test_bad_options_are_refused(options, message):
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(16, 16, 3, stride=2)))
    with pytest.raises(PassOptionError, match=f"blurpool: {message}"):
        get("blurpool").fn(gm, **options)


# ---------------------------------------------------------------- the module


def test_blurpool2d_keeps_shape_dtype_and_layout(real_batch):
    x = real_batch[0][:4].to(memory_format=torch.channels_last)
    blurred_x = BlurPool2d(3)(x)
    assert blurred_x.shape == x.shape and blurred_x.dtype == x.dtype
    assert blurred_x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(BlurPool2d(3, "delta")(x), x)
    # A constant image stays constant away from the zero-padded border (the filter sums to 1).
    flat = BlurPool2d(3)(torch.ones(1, 3, 8, 8))
    assert torch.allclose(flat[..., 1:-1, 1:-1], torch.ones(1, 3, 6, 6))
    with pytest.raises(ValueError, match="channels"):
        BlurPool2d(0)
    with pytest.raises(ValueError, match="kernel"):
        BlurPool2d(3, "box")
