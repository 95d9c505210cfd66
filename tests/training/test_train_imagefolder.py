"""Training on ImageNet-format data streamed from disk (``[data] format = "imagefolder"``):
a short run on a small folder of real images learns, at the ramped resolutions of
progressive resizing and the test resolution; the model gets the data's class count; the
ImageNet recipes validate; bad use is one line."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fastgraph.core.errors import UserError
from fastgraph.training.loop import TrainOptions, train
from fastgraph.training.recipes import load_recipe, lr_factor, torch_hyperparameters
from support import EXAMPLES, REPO, cli_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from imagenet_builders import write_imagenet_folder  # noqa: E402

RECIPE = """
name = "imagefolder_test"
title = "a short streamed run"
sources = ["tests"]
model = "in the test"

[train]
epochs = {epochs}
batch_size = 16

[optimizer]
lr = 0.4
momentum = 0.9
nesterov = true
weight_decay = 5e-4

[schedule]
knots = [0.0, 0.3, 1.0]
values = [0.1, 1.0, 0.0]

[augment]
pad = 0
flip = "random"

[data]
format = "imagefolder"
min_res = 32
max_res = 48
start_ramp = {start}
end_ramp = {end}
res_step = 8
test_res = 56
workers = 0

[eval]
tta_level = 1
batch_size = 25
"""


class TinyNet(nn.Module):
    """Three conv-BN-ReLU-pool blocks and a linear head; records the input sides it sees."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers, c = [], 3
        for width in (16, 32, 64):
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, data_path):
    """3 classes of real CIFAR-10 images upscaled to 40-96 pixels: 64 train and 20 val each."""
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet"), classes=3, per_class_train=64,
                                 per_class_val=20, sizes=(40, 96))


def _recipe(tmp_path, epochs=6, start=2, end=4):
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.format(epochs=epochs, start=start, end=end))
    return load_recipe(str(path))


def test_a_short_streamed_run_learns_at_the_ramped_resolutions(folder, tmp_path):
    sides, built = [], []

    def factory(num_classes=10):
        built.append(num_classes)
        model = TinyNet(num_classes)
        # the training batches (16 images) and the evaluations (25), not the pass checks' (2, 32)
        model.features[0].register_forward_pre_hook(
            lambda m, args: sides.append(args[0].shape[-1]) if len(args[0]) in (16, 25) else None)
        return model

    result = train(TrainOptions(model=factory, recipe=_recipe(tmp_path), data=str(folder), device="cpu"))
    epochs = result.runs[0].epochs
    assert built[-1] == 3  # the run's model: the data's class count, not the factory's default 10
    assert result.model.head.out_features == 3
    # 12 steps per epoch (192 // 16) at the epoch's resolution, then the evaluations at 56
    train_sides = [s for s in sides if s != 56]
    per_epoch = [sorted(set(train_sides[i * 12:(i + 1) * 12])) for i in range(6)]
    # FFCV's get_resolution: min_res through start_ramp (2), linear to max_res at end_ramp (4)
    assert per_epoch == [[32], [32], [32], [40], [48], [48]]
    assert len(train_sides) == 72 and 56 in sides  # the centre-cropped test resolution
    # seeds 0, 1, 2 measured: loss 1.43 -> 0.95, 1.23 -> 0.96, 1.32 -> 0.96; accuracy 0.55-0.60
    assert epochs[-1].train_loss < 0.85 * epochs[0].train_loss
    assert epochs[-1].tta_acc >= 0.5  # chance is 1/3 on these 60 images (sd 0.06)
    assert result.settings["data_format"] == "imagefolder"


def test_a_model_with_the_wrong_number_of_outputs_is_one_line(folder, tmp_path):
    with pytest.raises(UserError, match="outputs 10 logits per image but the data has 3 classes"):
        train(TrainOptions(model=lambda: TinyNet(10), recipe=_recipe(tmp_path, epochs=1), data=str(folder),
                           device="cpu"))


def test_a_streamed_recipe_without_data_is_one_line(capsys, tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.format(epochs=1, start=0, end=0))
    line = cli_error(capsys, "train", str(EXAMPLES / "resnet20.py"), "--recipe", str(path), "--device", "cpu")
    assert "--data ROOT" in line


def test_the_imagenet_recipes_validate_with_their_sources_numbers():
    lars = load_recipe("resnet50_lars")
    assert lars["optimizer"]["name"] == "lars" and lars["data"]["format"] == "imagefolder"
    assert torch_hyperparameters(lars, 32768).lr == 34.0
    assert torch_hyperparameters(lars, 4096).lr == pytest.approx(34.0 / 8)  # linear scaling
    assert lr_factor(lars, 0.0) == 0.0 and lr_factor(lars, 12 / 90) == pytest.approx(1.0)
    ffcv = load_recipe("resnet50_ffcv16")
    assert (ffcv["data"]["min_res"], ffcv["data"]["max_res"], ffcv["data"]["test_res"]) == (160, 192, 256)
    assert lr_factor(ffcv, 2 / 16) == pytest.approx(1.0) and lr_factor(ffcv, 1.0) == 0.0
    assert ffcv["optimizer"]["no_decay_names"] == ["bn"] and ffcv["optimizer"]["decay_bn_and_bias"]


def _decayed(gm, recipe) -> set[str]:
    from fastgraph.training.optim import build_optimizers

    (sgd,) = build_optimizers(gm, recipe, torch_hyperparameters(recipe, 4096))
    decayed = {id(p) for g in sgd.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    return {name for name, p in gm.named_parameters() if id(p) in decayed}


def test_resnet50_ffcv16_decays_what_ffcv_decays():
    """FFCV's create_optimizer (train_imagenet.py) exempts the parameters with "bn" in their
    name: bn1..bn3 of every block. The downsample BatchNorms ("downsample.1") and the fc
    bias are decayed, like every conv weight."""
    from fastgraph.core.loading import load_model
    from fastgraph.core.tracing import trace

    gm = trace(load_model(EXAMPLES / "resnet50.py"), mode="train")
    names = {name for name, _ in gm.named_parameters()}
    decayed = _decayed(gm, load_recipe("resnet50_ffcv16"))
    assert decayed == {n for n in names if "bn" not in n}
    assert {"layer1.0.downsample.1.weight", "layer1.0.downsample.1.bias", "fc.bias"} <= decayed
    assert "layer1.0.bn1.weight" not in decayed and "bn1.bias" not in decayed


def test_no_weight_decay_on_bn_and_biases_when_the_recipe_says_so(tmp_path):
    from fastgraph.core.tracing import trace

    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.format(epochs=1, start=0, end=1).replace(
        "weight_decay = 5e-4\n", "weight_decay = 5e-4\ndecay_bn_and_bias = false\n"))
    recipe = load_recipe(str(path))
    assert not recipe["optimizer"]["decay_bn_and_bias"]
    gm = trace(TinyNet(3), mode="train")
    decayed = _decayed(gm, recipe)
    for name, p in gm.named_parameters():
        assert (name in decayed) == (p.dim() > 1), name  # conv and linear weights only


def test_the_resnet50_example_builds_for_any_class_count():
    from fastgraph.core.loading import load_model

    model = load_model(EXAMPLES / "resnet50.py", num_classes=3)
    assert model.fc.out_features == 3
    assert sum(p.numel() for p in load_model(EXAMPLES / "resnet50.py").parameters()) == 25_557_032
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_two_processes_stream_what_one_process_streams(folder, tmp_path):
    """``--nproc 2`` (gloo, torchrun) on streamed data: each rank decodes its share of every
    global batch, so after 3 steps the weights equal one process at the same global batch
    to float rounding (ghost batches of 8 keep the BatchNorm statistics those of one process;
    measured 3e-6 of each tensor's scale; a wrong image, crop or flip changes them by ~1e-2)."""
    from fastgraph.training import checkpoint as ckpt

    model = tmp_path / "tiny.py"
    model.write_text("from torch import nn\n\n\n" + inspect.getsource(TinyNet)
                     + "\n\ndef build_model(num_classes=10):\n    return TinyNet(num_classes)\n")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(epochs=6, start=2, end=4)
                      + '\n[[passes]]\nname = "ghost_batchnorm"\nghost_batch_size = 8\n')
    common = ["--recipe", str(recipe), "--data", str(folder), "--epochs", "0.25", "--device", "cpu",
              "--no-progress-eval"]
    train(TrainOptions(model_path=str(model), recipe=load_recipe(str(recipe)), data=str(folder), device="cpu",
                       epochs=0.25, progress_eval=False, checkpoint_dir=str(tmp_path / "one")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "fastgraph", "train", str(model), *common, "--nproc", "2",
                           "--checkpoint", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    one, two = ckpt.load_checkpoint(tmp_path / "one"), ckpt.load_checkpoint(tmp_path / "two")
    assert one["step"] == two["step"] == 3 and two["settings"]["world_size"] == 2
    # the correct predictions summed over the ranks are one process's: each rank took its half
    assert two["epochs"][-1]["train_acc"] == pytest.approx(one["epochs"][-1]["train_acc"])
    for name, a in one["model"].items():
        if a.is_floating_point():
            b = two["model"][name]
            assert float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) < 1e-4, name
