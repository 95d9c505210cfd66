"""Training recipes: the shipped ones parse, name registered passes with options those
passes accept, apply to the model file they are written for, and convert to PyTorch's
conventions as their sources say; bad files fail in one line naming the file and key."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from fastgraph import passes as registry
from fastgraph.core.errors import UserError
from fastgraph.training.recipes import (
    check_passes_registered,
    load_recipe,
    lr_factor,
    shipped_recipes,
    torch_hyperparameters,
)
from fastgraph.training.trained import set_batchnorm
from support import REPO, cli_error, narrow_resnet9_source

SHIPPED = ("fast", "fast_muon", "page2019", "resnet20_seed_baseline")
# Passes that must rewrite the recipe's own model file (the rest may find it already in
# shape: airbench's network is built pool-before-BN with GELU).
APPLIED = {"page2019": ("whitening", "pool_before_bn", "swap_activation", "freeze_bn_scale",
                        "ghost_batchnorm", "fuse_bn_activation"),
           "fast": ("whitening", "freeze_bn_scale", "fuse_bn_activation"),
           "fast_muon": ("whitening", "freeze_bn_scale", "fuse_bn_activation"),
           "resnet20_seed_baseline": ()}

MINIMAL = """\
name = "mini"
title = "minimal recipe"
sources = ["a test"]
model = "model.py"
[train]
epochs = 1
batch_size = 32
[optimizer]
lr = 0.1
[schedule]
knots = [0.0, 1.0]
values = [1.0, 1.0]
"""


def write(tmp_path: Path, text: str, name: str = "r.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_recipes_are_shipped():
    assert set(SHIPPED) <= set(shipped_recipes())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_parses_and_its_passes_take_its_options(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    check_passes_registered(recipe)
    assert recipe[""]["sources"], "a recipe cites its sources"
    assert (REPO / recipe[""]["model"]).is_file(), "the model file it is written for exists"
    for step in recipe.passes:
        fn = registry.get(step.name).fn
        options = dict(step.options)
        if isinstance(options.get("images"), int):
            options["images"] = torch.zeros(1, 3, 32, 32)
        inspect.signature(fn).bind(None, **options)  # TypeError on an option the pass lacks
    if recipe["eval"]["tta_level"]:  # the trainer evaluates through tta_flip at this level
        gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()))
        with_tta = registry.get("tta_flip").fn(gm, level=recipe["eval"]["tta_level"])
        assert registry.rewrite_count(gm, with_tta) == 1
    if name == "resnet20_seed_baseline":
        inspect.signature(registry.get("stochastic_depth").fn).bind(None, **recipe["stochastic_depth"])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_passes_apply_to_its_model_file(name, real_batch, tmp_path):
    from fastgraph.core.loading import load_model
    from fastgraph.core.pass_manager import run_passes
    from fastgraph.core.tracing import trace
    from fastgraph.core.verification import verification_batch

    recipe = load_recipe(name)
    path = REPO / recipe[""]["model"]
    if name == "page2019":
        # The file's own ResNet9 at a quarter of its widths: the same passes at the same sites,
        # where the full network's six float64 checks take 80 s on 2 cores.
        path = tmp_path / "resnet9.py"
        path.write_text(narrow_resnet9_source((16, 32, 64, 128)))
    gm = trace(load_model(path), source=path)
    set_batchnorm(gm, recipe["batchnorm"])  # as training_graph does: the checks see the trained function
    x, y = real_batch
    options = {}
    for step in recipe.passes:
        opts = dict(step.options)
        if isinstance(opts.get("images"), int):
            opts["images"] = x  # 64 real images suffice to check the rewrite applies
        options[step.name] = opts
    # Checked on the batch the trainer checks on (32 images, every class), in float64.
    out, report = run_passes(gm, [s.name for s in recipe.passes], mode="train",
                             batch=verification_batch(x, y), options=options)
    status = {o["name"]: o["status"] for o in report.to_dict()["passes"]}
    assert set(status) == {s.name for s in recipe.passes}
    for needed in APPLIED[name]:
        assert status[needed] == "applied", (needed, report.to_dict())
    out.train()
    assert out(x).shape == (64, 10)


def test_decoupled_units_convert_as_airbench_does():
    # airbench94: lr 11.5 per 1024 examples, momentum 0.85, wd 0.0153 -> torch.optim.SGD on a
    # batch-summed loss gets lr 11.5 / (1024 * (1 + 1/0.15)), wd * batch / kilostep as lr*wd.
    recipe = load_recipe("fast")
    h = torch_hyperparameters(recipe, 1024)
    kilostep = 1024 * (1 + 1 / (1 - 0.85))
    sum_lr = 11.5 / kilostep
    assert h.lr == pytest.approx(sum_lr * 1024)  # mean loss = summed loss / batch
    assert h.lr * h.weight_decay == pytest.approx(0.0153 * 1024 / kilostep)  # decay per step
    assert h.momentum == 0.85 and h.nesterov
    # the decoupled lr grows with the batch, the per-step decay too
    assert torch_hyperparameters(recipe, 512).lr == pytest.approx(h.lr / 2)


def test_summed_units_convert_as_airbench94_muon_does():
    # airbench94_muon.py: reduction="sum" over 2000, head lr 0.67, weight_decay = wd / lr with
    # wd = 2e-6 * 2000: the same steps on a batch-mean loss need lr x 2000, and every group
    # still decays by 0.004 per step.
    recipe = load_recipe("fast_muon")
    h = torch_hyperparameters(recipe, 2000)
    assert h.lr == pytest.approx(0.67 * 2000) and h.lr * h.weight_decay == pytest.approx(0.004)
    bias = next(p for p in recipe.passes if p.name == "freeze_bn_scale").options
    assert h.lr * bias["bias_lr_scale"] == pytest.approx(0.053 * 2000)
    assert (h.lr * bias["bias_lr_scale"]) * (h.weight_decay * bias["bias_wd_scale"]) == pytest.approx(0.004)
    assert recipe["muon"]["lr"] == 0.24 and recipe["muon"]["momentum"] == 0.6
    assert [lr_factor(recipe, p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.5, 0.0])


# Keys a recipe states without a source of their own (the file's identity).
_UNCITED = {"name", "title", "sources", "model", "knots", "values", "units", "notes"}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_hyperparameter_line_says_where_it_comes_from(name):
    """Each `key = value` of a shipped recipe carries a comment: its source (file and
    function) or, where fastgraph deviates, the reason, as the header explains."""
    text = (REPO / "profiles" / "recipes" / f"{name}.toml").read_text()
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+)\s*=", line)
        if match and match.group(1) not in _UNCITED:
            assert "#" in line, f"{name}.toml: {line!r} has no comment"


def test_torch_units_pass_through():
    h = torch_hyperparameters(load_recipe("page2019"), 512)
    assert (h.lr, h.weight_decay, h.momentum, h.nesterov) == (1.0, 5e-4, 0.9, True)


def test_schedules_follow_their_sources():
    page = load_recipe("page2019")  # 0 -> 1 at epoch 2 -> 0.1 at epoch 8, held to 10
    assert [lr_factor(page, e / 10) for e in (0, 1, 2, 5, 8, 9, 10)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.55, 0.1, 0.1, 0.1])
    he = load_recipe("resnet20_seed_baseline")  # /10 at epochs 80 and 160 of 200
    assert [lr_factor(he, e / 200) for e in (0, 79, 80, 159, 160, 199)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    fast = load_recipe("fast")  # airbench's triangle(start=0.2, peak=0.23, end=0.07)
    assert [lr_factor(fast, p) for p in (0.0, 0.23, 1.0)] == pytest.approx([0.2, 1.0, 0.07])


def test_user_toml_file_is_accepted_with_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.name == "mini" and recipe.passes == ()
    assert recipe["augment"]["pad"] == 0 and recipe["ema"]["enabled"] is False


@pytest.mark.parametrize(("edit", "pattern"), [
    (lambda t: t.replace("[train]\n", "[train]\nepocs = 3\n"), r"unknown key 'train\.epocs'"),
    (lambda t: t + "[augmnt]\npad = 2\n", r"unknown key 'augmnt'"),
    (lambda t: t.replace("batch_size = 32", "batch_size = 0"), r"'train\.batch_size' must be >= 1"),
    (lambda t: t.replace("batch_size = 32", 'batch_size = "32"'), r"'train\.batch_size' must be an integer"),
    (lambda t: t.replace("lr = 0.1", "lr = -1.0"), r"'optimizer\.lr' must be > 0"),
    (lambda t: t.replace("[optimizer]\nlr = 0.1", "[optimizer]"), r"missing key 'optimizer\.lr'"),
    (lambda t: t.replace("values = [1.0, 1.0]", "values = [1.0]"), r"'schedule\.values' must be a list"),
    (lambda t: t.replace("knots = [0.0, 1.0]", "knots = [0.0, 0.5, 1.0]"), r"differ in length"),
    (lambda t: t.replace("knots = [0.0, 1.0]", "knots = [0.5, 1.0]"), r"must rise from 0 to 1"),
    (lambda t: t + '[augment]\nflip = "sometimes"\n', r"'augment\.flip' must be one of"),
    (lambda t: t + "[eval]\ntta_level = 3\n", r"'eval\.tta_level' must be one of"),
    (lambda t: t + '[eval]\nmodel = "ema"\n', r"\[ema\] is not enabled"),
    (lambda t: t + "[[passes]]\nkernel_size = 3\n", r"'passes\[0\]\.name'"),
    (lambda t: t + "[train\n", r"invalid TOML"),
])
def test_bad_recipe_is_one_line_naming_file_and_key(tmp_path, edit, pattern):
    path = write(tmp_path, edit(MINIMAL))
    with pytest.raises(UserError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message
    assert path in message
    assert re.search(pattern, message), message


def test_unknown_pass_names_the_recipe(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL + '[[passes]]\nname = "whitenning"\n'))
    with pytest.raises(UserError, match=r"r\.toml: unknown pass 'whitenning'"):
        check_passes_registered(recipe)


def test_unknown_recipe_name_and_missing_file():
    with pytest.raises(UserError, match="unknown recipe 'page2020'; shipped recipes: .*page2019"):
        load_recipe("page2020")
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe("/nonexistent/recipe.toml")


def test_cli_bad_recipe_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, MINIMAL.replace("[train]\n", "[train]\nepocs = 3\n"))
    line = cli_error(capsys, "train", str(REPO / "examples" / "resnet9.py"), "--recipe", path)
    assert "unknown key 'train.epocs'" in line and path in line


def test_a_checkpoint_written_before_the_schema_grew_is_the_same_recipe():
    from fastgraph.training.recipes import same_recipe

    current = load_recipe("page2019").to_dict()
    older = {k: dict(v) if isinstance(v, dict) else v for k, v in current.items()}
    del older["optimizer"]["name"], older["schedule"]["type"]  # keys this checkpoint predates
    del older["optimizer"]["reference_batch_size"], older["optimizer"]["decay_bn_and_bias"], older["data"]
    assert same_recipe(older, current)
    changed = {**older, "optimizer": {**older["optimizer"], "lr": older["optimizer"]["lr"] * 2}}
    assert not same_recipe(changed, current)
    lars = {**current, "optimizer": {**current["optimizer"], "name": "lars"}}
    assert not same_recipe(older, lars)  # a missing key counts as its default, not as anything
    streamed = {**current, "data": {**current["data"], "format": "imagefolder"}}
    assert not same_recipe(older, streamed)  # a missing section counts as its defaults only
