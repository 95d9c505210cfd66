"""``fastgraph train --plot``: the accuracy curves of a real two-run training on real
CIFAR-10, drawn from the records the training wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fastgraph.core.errors import UserError
from fastgraph.training.curves import curves_figure
from support import cli_error, write_model, write_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
TARGET = 0.05  # below chance (10%): reached at the first epoch, so the star is drawn
TINY = (8, 16, 16, 32)  # ResNet-9 widths: a few ms per step on a CPU


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_path):
    """A real `fastgraph train --runs 2 --plot --target --json` of a narrow ResNet-9: 2 epochs
    of 5 steps over 320 training images, evaluated on 200 test images (about 10 s: most of
    it the float64 checks of the recipe's passes)."""
    tmp = tmp_path_factory.mktemp("curves")
    model = write_model(tmp, widths=TINY)
    recipe = write_recipe(tmp, epochs=2, batch_size=64, whitening_images=320, ghost_batch_size=None)
    from fastgraph.cli.main import main

    png, js = tmp / "curves.png", tmp / "result.json"
    assert main(["train", str(model), "--recipe", str(recipe), "--subset", "320", "--test-subset", "200",
                 "--runs", "2", "--target", str(TARGET), "--data", data_path, "--plot", str(png),
                 "--json", str(js)]) == 0
    return png, json.loads(js.read_text())


def test_plot_is_a_real_image(trained):
    png, _ = trained
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size == (1320, 572)  # 12 x 5.2 inches at 110 dpi
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # drawn, not blank


def _gids(ax, kind="lines"):
    return {a.get_gid(): a for a in getattr(ax, kind) if a.get_gid()}


def test_curves_have_one_line_per_run_the_mean_band_and_target(trained):
    _, record = trained
    runs = record["runs"]
    assert len(runs) == 2 and all(e["tta_acc"] is not None for r in runs for e in r["epochs"])
    fig = curves_figure(record)
    assert len(fig.axes) == 2
    for ax, x_of in zip(fig.axes, (lambda e: e["elapsed"] + e["tta_seconds"], lambda e: e["epoch"]),
                        strict=True):
        lines = _gids(ax)
        for metric, key in (("tta", "tta_acc"), ("plain", "test_acc")):
            for k, run in enumerate(runs, start=1):
                line = lines[f"{metric} run {k}"]
                assert list(line.get_xdata()) == pytest.approx([x_of(e) for e in run["epochs"]])
                assert list(line.get_ydata()) == pytest.approx([100 * e[key] for e in run["epochs"]])
            per_epoch = np.array([[100 * e[key] for e in r["epochs"]] for r in runs])  # (runs, epochs)
            mean, std = per_epoch.mean(0), per_epoch.std(0, ddof=1)
            xs = np.array([[x_of(e) for e in r["epochs"]] for r in runs]).mean(0)
            line = lines[f"{metric} mean"]
            assert list(line.get_xdata()) == pytest.approx(list(xs))
            assert list(line.get_ydata()) == pytest.approx(list(mean))
            band = _gids(ax, "collections")[f"{metric} band"].get_paths()[0].vertices
            assert band[:, 1].min() == pytest.approx((mean - std).min())
            assert band[:, 1].max() == pytest.approx((mean + std).max())
        assert len([g for g in lines if " run " in g]) == 4  # 2 runs x (TTA, plain), nothing more
        target = lines["target"]
        assert list(target.get_ydata()) == [100 * TARGET, 100 * TARGET]
    reached = record["summary"]["target"]
    assert reached["reached"]  # the star sits at the mean time and epoch where the mean reached it
    star_s, star_e = (_gids(ax)["target reached"] for ax in fig.axes)
    assert star_s.get_xdata()[0] == pytest.approx(reached["seconds"])
    assert star_e.get_xdata()[0] == reached["epoch"]
    assert list(star_s.get_ydata()) == list(star_e.get_ydata()) == [100 * reached["mean_tta_acc"]]
    assert record["recipe"]["recipe"]["name"] in fig.get_suptitle()
    assert "model.py" in fig.get_suptitle() and record["device"] in fig.get_suptitle()
    labels = [ax.get_xlabel() for ax in fig.axes] + [fig.axes[0].get_ylabel()]
    assert "(s)" in labels[0] and labels[1] == "epochs" and "(%)" in labels[2]


def test_without_per_epoch_accuracy_there_is_no_curve_to_draw(trained, capsys, tmp_path):
    _, record = trained
    last_only = json.loads(json.dumps(record))
    for run in last_only["runs"]:
        run["epochs"][0]["tta_acc"] = run["epochs"][0]["test_acc"] = None  # as --no-progress-eval writes
    with pytest.raises(UserError, match="drop --no-progress-eval"):
        curves_figure(last_only)
    # The CLI refuses the combination, and a plot it cannot write, before any training.
    model, recipe = write_model(tmp_path), write_recipe(tmp_path)
    assert "--no-progress-eval" in cli_error(capsys, "train", str(model), "--recipe", str(recipe),
                                             "--plot", str(tmp_path / "c.png"), "--no-progress-eval")
    assert "suffix '.txt'" in cli_error(capsys, "train", str(model), "--recipe", str(recipe),
                                        "--plot", str(tmp_path / "c.txt"))
