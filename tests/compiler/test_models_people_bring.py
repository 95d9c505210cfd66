"""Models people bring: ImageNet-style ResNets, module-level instances, other input shapes,
outputs that are tuples, lists or dicts.

The model files under ``tests/models/`` follow torchvision's ResNet, ResNeXt and
MobileNetV2 at a quarter of the width: an ImageNet stem on 32x32 images leaves 1x1 maps in
the last stage, where BatchNorm in train mode has one value per channel for one image.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import runpy
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from fastgraph.cli.main import main
from fastgraph.core.errors import ModelError
from fastgraph.core.loading import load_model
from fastgraph.perf.nodes import node_points
from fastgraph.perf.roofline import count_flops, load_profile, node_costs
from support import cli_error

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = Path(__file__).parents[1] / "models"
STYLES = ["resnet18.py", "resnet50.py", "resnext50_32x4d.py", "mobilenet_v2.py"]
SYNTHETIC_INPUT = "synthetic input: verification on random normal data"  # the label the issue asks for


_runs = itertools.count()


def _model(file: str, factory: str) -> nn.Module:
    """``factory()`` of ``tests/models/<file>``, with its default (quarter) width."""
    return runpy.run_path(str(MODELS / file))[factory]()


def _write(folder: Path, text: str, name: str = "model.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def _optimize(folder: Path, model: Path, *extra: str) -> dict:
    """``fastgraph optimize`` at a CPU test's scale (batch 8, one timed step); its JSON report."""
    report = folder / f"{model.stem}-{next(_runs)}.json"
    argv = ["optimize", str(model), "--batch-size", "8", "--steps", "1", "--epochs", "1",
            "--out", str(folder / "optimized.pt"), "--json", str(report), *extra]
    torch.manual_seed(0)
    assert main(argv) == 0
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def reports(tmp_path_factory, data_path):
    """``fastgraph optimize`` reports, each run once per module: key (file, extra argv)."""
    folder = tmp_path_factory.mktemp("reports")
    cache: dict = {}

    def get(model: Path, *extra: str) -> dict:
        key = (str(model), extra)
        if key not in cache:
            cache[key] = _optimize(folder, model, "--data", data_path, *extra)
        return cache[key]

    return get


# --------------------------------------------------------------------------------------
# FLOPs of ImageNet-style models in train mode
# --------------------------------------------------------------------------------------


def test_resnet18_flops_per_image_on_one_image_match_the_inference_count():
    gm = torch.fx.symbolic_trace(_model("resnet.py", "resnet18"))
    one, two = torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)
    counted = count_flops(gm, one)  # train mode on one image raised in BatchNorm over 1x1 maps
    assert counted == count_flops(gm, two) and counted.batch_size == 2
    # The forward FLOPs per image of the train-mode count are those of the node-by-node
    # (inference) count, and the backward adds twice the forward but for the stem's input
    # gradient (the images need none): 7x7 conv, 3 -> 16 channels, 16x16 outputs.
    assert counted.forward == sum(c.flops for c in node_costs(gm, one)) > 0
    stem_flops = 2 * 16 * 16 * 16 * 3 * 7 * 7
    assert counted.train == 3 * counted.forward - stem_flops


@pytest.mark.parametrize(("file", "factory"),
                         [("resnet.py", "resnext50_32x4d"), ("mobilenet_v2.py", "build_model")])
def test_grouped_conv_weight_gradients_count_once_per_group(file, factory):
    """ResNeXt's 32-group and MobileNetV2's depthwise convs: the training FLOPs are those of
    the per-node model (forward x (1 + input gradient + weight gradient)), about 3x the
    forward, not the groups-fold weight gradient torch's own formula counts."""
    gm = torch.fx.symbolic_trace(_model(file, factory))
    counted = count_flops(gm, torch.randn(1, 3, 32, 32))
    points = node_points(gm, load_profile("a100"), "fp32", mode="train", batch_size=4,
                         example=torch.randn(2, 3, 32, 32))
    assert counted.train * 4 == sum(p.flops for p in points)
    assert 2.5 < counted.train / counted.forward < 3


def test_a_depthwise_conv_counts_its_weight_gradient_like_its_forward():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    forward = 2 * 8 * 1 * 9 * 25  # per image: C_out x C_in/groups x kernel x output pixels, x2
    counted = count_flops(conv, torch.randn(2, 8, 5, 5))
    assert counted.forward == forward
    assert counted.train == 2 * forward  # forward + weight gradient (the input needs no gradient)


@pytest.mark.parametrize("name", STYLES)
def test_optimize_train_mode_runs_each_imagenet_style_model(reports, name):
    report = reports(MODELS / name)
    (outcome,) = report["passes"]
    assert outcome["name"] == "pool_before_activation"
    # the ResNets' stem ReLU -> max-pool is rewritten; MobileNetV2 has no max-pool
    assert outcome["status"] == ("no-op" if name == "mobilenet_v2.py" else "applied")
    before, after = report["roofline"]
    forward = outcome["flops_before"]
    assert 2 * forward < before["step_flops_per_image"] < 3 * forward
    assert after["measured_step_seconds"] > 0
    assert report["input"] == {"shape": [3, 32, 32], "data": "real CIFAR-10 test images"}


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="torchvision is not installed: its own resnet18 and mobilenet_v2 are not run")
@pytest.mark.parametrize("factory", ["resnet18", "mobilenet_v2"])
def test_optimize_train_mode_runs_torchvision_models(tmp_path, data_path, factory):
    path = _write(tmp_path, f"""
        from torchvision.models import {factory}
        def build_model():
            return {factory}(num_classes=10)
    """)
    report = _optimize(tmp_path, path, "--data", data_path)
    assert report["passes"] and report["roofline"][0]["step_flops_per_image"] > 0


# --------------------------------------------------------------------------------------
# Module-level instances as entry points
# --------------------------------------------------------------------------------------


def test_a_module_level_instance_is_the_entry():
    model = load_model(MODELS / "resnet18.py")  # net = resnet18() at module level
    assert type(model).__name__ == "ResNet" and model.fc.in_features == 16 * 8


def test_instance_rules(tmp_path, capsys):
    net_of_its_class = _write(tmp_path, """
        from torch import nn
        relu = nn.ReLU()  # a shared helper without parameters is not a candidate
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(2, 3)
        net = Net()
        net.fc.bias.data.fill_(7.0)
    """, "one.py")
    assert load_model(net_of_its_class).fc.bias.eq(7.0).all()  # the instance, not a new Net()

    named_model = _write(tmp_path, "from torch import nn\nmodel = nn.Linear(2, 5)\n", "named.py")
    assert load_model(named_model).out_features == 5  # used as it is, not called

    two = _write(tmp_path, """
        from torch import nn
        backbone = nn.Linear(2, 4)
        wrapped = nn.Sequential(backbone, nn.ReLU())  # holds backbone: one model
        other = nn.Linear(4, 3)
    """, "two.py")
    assert load_model(two, entry="other").out_features == 3
    line = cli_error(capsys, "optimize", str(two))
    assert "ambiguous entry point" in line and "wrapped, other" in line and "backbone" not in line
    with pytest.raises(ModelError, match="ambiguous entry point.*net, Other"):
        load_model(_write(tmp_path, """
            from torch import nn
            class Other(nn.Module):
                pass
            net = nn.Linear(2, 2)
        """, "class_and_instance.py"))


# --------------------------------------------------------------------------------------
# --input-shape
# --------------------------------------------------------------------------------------


def test_input_shape_64_quadruples_the_flops_of_a_fully_convolutional_model(reports):
    small = reports(MODELS / "resnet18.py")
    large = reports(MODELS / "resnet18.py", "--input-shape", "3,64,64")
    assert large["input"] == {"shape": [3, 64, 64],
                              "data": "real CIFAR-10 test images, resized bilinearly to 64x64"}
    ratio = large["passes"][0]["flops_before"] / small["passes"][0]["flops_before"]
    # every conv does 4x the work; only the head (the same linear layer on pooled features) does not
    assert 3.99 < ratio < 4
    assert large["passes"][0]["status"] == "applied"


def test_other_channel_counts_verify_on_labelled_synthetic_data(tmp_path, capsys):
    path = _write(tmp_path, """
        from torch import nn
        def build_model():
            return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    """)
    # no CIFAR-10 is read: the data path does not even exist
    report = _optimize(tmp_path, path, "--input-shape", "1,28,28", "--data", str(tmp_path / "none"))
    assert report["input"] == {"shape": [1, 28, 28], "data": SYNTHETIC_INPUT}
    assert SYNTHETIC_INPUT in capsys.readouterr().out
    assert report["passes"][0]["status"] == "applied"


@pytest.mark.parametrize("value", ["3,32", "3,0,32", "a,b,c", "3,32,32,1", "-1,32,32", ""])
def test_bad_input_shape_is_one_line(tmp_path, capsys, value):
    line = cli_error(capsys, "optimize", str(MODELS / "resnet50.py"), f"--input-shape={value}",
                     "--out", str(tmp_path / "o.pt"))
    assert f"--input-shape must be C,H,W positive integers, got {value!r}" in line


# --------------------------------------------------------------------------------------
# Outputs that are tuples, lists or dicts
# --------------------------------------------------------------------------------------


def test_models_returning_dicts_of_lists_are_counted_and_timed_in_train_mode(tmp_path, data_path):
    path = _write(tmp_path, """
        import torch
        from torch import nn
        class TwoHeads(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3, padding=1)
                self.bn = nn.BatchNorm2d(8)
                self.pool = nn.MaxPool2d(2)
                self.fc = nn.Linear(8, 10)
                self.aux = nn.Linear(8, 4)
            def forward(self, x):
                f = self.pool(torch.relu(self.bn(self.conv(x))))
                f = torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1)
                return {"logits": self.fc(f), "extra": (self.aux(f), [f])}
    """)
    report = _optimize(tmp_path, path, "--data", data_path, "--mode", "train")
    before, _ = report["roofline"]
    assert before["measured_step_seconds"] > 0
    conv, heads = 2 * 8 * 3 * 9 * 32 * 32, 2 * 8 * (10 + 4)  # forward FLOPs per image
    # forward, plus both heads' input and weight gradients and the conv's weight gradient
    assert before["step_flops_per_image"] == 2 * conv + 3 * heads
