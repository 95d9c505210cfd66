"""The seed paper's multi-GPU recipes (resnet20_seed_4gpu, resnet20_seed_best): they load,
cite their sources, build the networks the paper names (pre-activation ResNet-20, stochastic
depth 0.5 at every block, per-GPU BatchNorm over 256 images), follow He et al.'s schedule
with Goyal et al.'s scaling and warm-up at the real step counts, and a short real training
trains exactly that."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from fastgraph import passes as registry
from fastgraph.core.loading import load_model
from fastgraph.core.modules import GhostBatchNorm, StochasticDepth
from fastgraph.core.tracing import trace
from fastgraph.training import distributed as dp
from fastgraph.training.recipes import (
    check_passes_registered,
    load_recipe,
    lr_factor,
    shipped_recipes,
    torch_hyperparameters,
)
from fastgraph.training.trained import training_graph
from support import EXAMPLES, REPO

pytestmark = pytest.mark.usefixtures("one_thread")

SEED_RECIPES = ("resnet20_seed_4gpu", "resnet20_seed_best")
GPUS, PER_GPU = 4, 256  # the seed paper's best model: "batch size of 1024" on its 4 GPUs


def modules(gm: nn.Module, kind: type) -> list[nn.Module]:
    """``gm``'s modules of ``kind``, in registration order."""
    return [m for m in gm.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("name", SEED_RECIPES)
def test_recipe_loads_cites_and_its_passes_take_its_options(name):
    assert name in shipped_recipes()
    recipe = load_recipe(name)
    assert recipe.name == name
    check_passes_registered(recipe)
    assert (REPO / recipe[""]["model"]).is_file()
    assert any("../shared/sources/000" in s for s in recipe[""]["sources"])
    assert any("1706.02677" in s for s in recipe[""]["sources"])  # Goyal et al.
    for step in recipe.passes:
        inspect.signature(registry.get(step.name).fn).bind(None, **step.options)
    inspect.signature(registry.get("stochastic_depth").fn).bind(None, **recipe["stochastic_depth"])
    assert recipe["train"]["batch_size"] == GPUS * PER_GPU
    ghost = recipe.passes[-1]
    assert ghost.name == "ghost_batchnorm" and ghost.options == {"ghost_batch_size": PER_GPU}
    text = (REPO / "profiles" / "recipes" / f"{name}.toml").read_text()
    assert f"--recipe {name} --nproc {GPUS}" in text  # the 4-process command is in the header
    for line in text.splitlines():  # every hyperparameter says where it comes from
        match = re.match(r"^([a-z_]+)\s*=", line)
        if match and match.group(1) not in {"name", "title", "sources", "model", "knots", "values", "units"}:
            assert "#" in line, f"{name}.toml: {line!r} has no comment"


def test_best_recipe_is_the_papers_configuration():
    best = load_recipe("resnet20_seed_best")
    assert best[""]["model"] == "examples/preact_resnet20.py"
    (drop,) = [p for p in best.passes if p.name == "stochastic_depth"]
    assert drop.options == {"survival_first": 0.5, "survival_last": 0.5, "per": "sample"}
    # --stochastic-depth adds the [stochastic_depth] table's pass: the same probabilities.
    assert dict(best["stochastic_depth"]) == {"survival_first": 0.5, "survival_last": 0.5}
    four = load_recipe("resnet20_seed_4gpu")
    assert four[""]["model"] == "examples/resnet20.py"
    assert [p.name for p in four.passes] == ["ghost_batchnorm"]


def test_a_bad_survival_range_is_one_line_naming_the_key(tmp_path, real_batch):
    from fastgraph.core.errors import UserError

    text = (REPO / "profiles" / "recipes" / "resnet20_seed_best.toml").read_text()
    table = "survival_first = 0.5              # as [[passes]]"  # the [stochastic_depth] table's line
    assert text.count(table) == 1 and text.count("survival_first = 0.5") == 2
    path = tmp_path / "r.toml"
    path.write_text(text.replace(table, "survival_first = 0.0  #"))
    with pytest.raises(UserError, match=r"r\.toml: 'stochastic_depth\.survival_first' must be > 0, got 0\.0"):
        load_recipe(str(path))
    path.write_text(text.replace("survival_first = 0.5", "survival_first = 1.5", 1))  # the [[passes]] entry
    recipe = load_recipe(str(path)).to_dict()
    x, y = real_batch
    gm = trace(load_model(EXAMPLES / "preact_resnet20.py"), mode="train")
    with pytest.raises(UserError, match=r"^pass stochastic_depth: survival_first must be a number in \(0, 1"):
        training_graph(gm, recipe, images=x, labels=y, checks=False)


def test_schedules_at_the_real_step_counts(cifar10):
    # 50,000 images in full batches of 1024: 48 steps per epoch. Goyal et al.: 0.1 (He et
    # al.'s lr at batch 128) rising linearly to 0.8 = 0.1 x 1024 / 128 at the end of epoch
    # 5; then /10 at 50% and 75% of the steps (best: He et al.'s 32k and 48k of 64k) or at
    # epochs 80 and 160 of 200 (4gpu: the baseline's).
    per_epoch = len(cifar10.train_images) // (GPUS * PER_GPU)
    assert per_epoch == 48

    def lr(recipe, step):
        total = math.ceil(per_epoch * recipe["train"]["epochs"])
        return torch_hyperparameters(recipe, GPUS * PER_GPU).lr * lr_factor(recipe, step / total)

    best = load_recipe("resnet20_seed_best")
    total = 164 * per_epoch
    steps = (0, 120, 240, 241, total // 2 - 1, total // 2, total * 3 // 4 - 1, total * 3 // 4, total - 1)
    assert [lr(best, s) for s in steps] == pytest.approx([0.1, 0.45, 0.8, 0.8, 0.8, 0.08, 0.08, 0.008, 0.008])
    four = load_recipe("resnet20_seed_4gpu")
    steps = (0, 120, 240, 80 * per_epoch - 1, 80 * per_epoch, 160 * per_epoch - 1, 160 * per_epoch)
    assert [lr(four, s) for s in steps] == pytest.approx([0.1, 0.45, 0.8, 0.8, 0.08, 0.08, 0.008])
    for recipe in (best, four):
        h = torch_hyperparameters(recipe, GPUS * PER_GPU)
        assert (h.momentum, h.nesterov, h.weight_decay) == (0.9, False, 1e-4)  # He et al., unscaled


def test_the_full_networks_are_the_papers(real_batch):
    # The recipes' graphs of the example files at full width, built as the trainer builds
    # them (the float64 checks of these passes run in the training test below).
    x, y = real_batch
    best = load_recipe("resnet20_seed_best").to_dict()
    preact = EXAMPLES / "preact_resnet20.py"
    gm = trace(load_model(preact), source=preact, mode="train")
    out, report = training_graph(gm, best, images=x, labels=y, checks=False)
    assert [o["status"] for o in report["passes"]] == ["applied", "applied"]
    assert [m.survival for m in modules(out, StochasticDepth)] == [0.5] * 9  # every block of 9
    assert all(m.per == "sample" for m in modules(out, StochasticDepth))
    assert len(modules(out, nn.BatchNorm2d)) == 19  # 2 per block and the final one
    assert [m.ghost_batch_size for m in modules(out, GhostBatchNorm)] == [PER_GPU] * 19
    with_flag, _ = training_graph(gm, best, images=x, labels=y, checks=False, stochastic_depth=True)
    assert [m.survival for m in modules(with_flag, StochasticDepth)] == [0.5] * 9  # the flag changes nothing

    four = load_recipe("resnet20_seed_4gpu").to_dict()
    plain = EXAMPLES / "resnet20.py"
    gm = trace(load_model(plain), source=plain, mode="train")
    out, _ = training_graph(gm, four, images=x, labels=y, checks=False)
    assert not modules(out, StochasticDepth)
    assert [m.ghost_batch_size for m in modules(out, GhostBatchNorm)] == [PER_GPU] * 19


def test_one_process_at_1024_normalises_as_four_gpus_at_256(cifar10):
    # Ghost batches of 256 in one process are what 4 GPUs with their own BatchNorm over 256
    # images compute, with the data-parallel split the trainer uses (each rank one whole
    # ghost batch): outputs, input gradients and the averaged running statistics.
    from fastgraph.data import normalize

    images = normalize(cifar10.train_images[torch.randperm(len(cifar10.train_images))[:GPUS * PER_GPU]])
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3)
    nn.init.uniform_(plain.weight, 0.5, 1.5)
    nn.init.uniform_(plain.bias, -0.5, 0.5)
    ghost = GhostBatchNorm.from_batchnorm(plain, PER_GPU).train()
    x = images.clone().requires_grad_(True)
    out = ghost(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    assert dp.ghost_batch_size(ghost) == PER_GPU
    means, variances = [], []
    for rank in range(GPUS):
        where = dp.batch_positions(GPUS * PER_GPU, GPUS, rank, PER_GPU)
        gpu = nn.BatchNorm2d(3)
        gpu.load_state_dict(plain.state_dict())
        xr = images[where].clone().requires_grad_(True)
        out_r = gpu.train()(xr)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)[where]
        (out_r * weights).sum().backward()
        torch.testing.assert_close(out[where], out_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad[where], xr.grad, rtol=1e-5, atol=1e-5)
        means.append(gpu.running_mean)
        variances.append(gpu.running_var)
    torch.testing.assert_close(ghost.running_mean, torch.stack(means).mean(0))  # dp.average_running_stats
    torch.testing.assert_close(ghost.running_var, torch.stack(variances).mean(0))
    whole = nn.BatchNorm2d(3)
    whole.load_state_dict(plain.state_dict())
    assert not torch.allclose(whole.train()(images), out, atol=1e-3)  # one BatchNorm over 1024 differs


def narrow_preact_resnet20(folder: Path) -> Path:
    """``examples/preact_resnet20.py`` at a quarter of its widths (4/8/16): the same 9
    blocks and 19 BatchNorms at the same sites, where the full network's float64 pass checks
    take a minute on 2 cores."""
    text = (EXAMPLES / "preact_resnet20.py").read_text()
    for old, new in (("(16, 32, 64)", "(4, 8, 16)"), ("nn.Conv2d(3, 16,", "nn.Conv2d(3, 4,"),
                     ("c_in = [], 16", "c_in = [], 4"), ("nn.BatchNorm2d(64)", "nn.BatchNorm2d(16)"),
                     ("nn.Linear(64,", "nn.Linear(16,")):
        assert text.count(old) == 1, f"examples/preact_resnet20.py changed: {old!r}"
        text = text.replace(old, new)
    path = folder / "preact_resnet20.py"
    path.write_text(text)
    return path


def test_short_real_training_trains_the_papers_graph(tmp_path, data_path):
    # Four steps of 256 real images (one per "epoch", --epochs 4 --batch-size 256): the
    # recipe's schedule compressed to 4 steps puts one step in each phase, so the trainer's
    # lr is the warm-up start, the peak, and the two /10 steps, scaled to the batch.
    import fastgraph

    result = fastgraph.train(narrow_preact_resnet20(tmp_path), recipe="resnet20_seed_best", data=data_path,
                             epochs=4, batch_size=PER_GPU, subset=PER_GPU, test_subset=100,
                             progress_eval=False, device="cpu")
    run = result.runs[0]
    assert [e.step for e in run.epochs] == [1, 2, 3, 4]
    # at batch 256 the linear scaling rule gives a peak of 0.1 x 256 / 128 = 0.2
    assert [e.lr for e in run.epochs] == pytest.approx([0.025, 0.2, 0.02, 0.002])
    assert all(math.isfinite(e.train_loss) for e in run.epochs)
    assert 0.0 <= run.test_acc <= 1.0
    applied = [p["name"] for p in result.to_dict()["runs"][0]["passes"]["passes"] if p["status"] == "applied"]
    assert applied == ["stochastic_depth", "ghost_batchnorm"]
    model = result.model
    assert [m.survival for m in modules(model, StochasticDepth)] == [0.5] * 9
    assert [m.ghost_batch_size for m in modules(model, GhostBatchNorm)] == [PER_GPU] * 19
    assert result.settings["stochastic_depth"] is False  # no flag: the recipe itself drops the blocks
