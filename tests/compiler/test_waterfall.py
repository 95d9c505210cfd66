"""The optimize waterfall: from the JSON a real `fastgraph optimize` wrote, each bar spans the
roofline times of its pass's FLOPs and bytes, and the measured panel shows every timed step."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fastgraph.compiler.waterfall import plot_waterfall, waterfall_figure
from fastgraph.core.errors import UserError
from fastgraph.perf.roofline import load_profile, roofline
from support import write_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def report(tmp_path_factory, data_path) -> dict:
    """`fastgraph optimize --mode infer --json` of a narrow ResNet-9 (pool_before_activation
    and fold_bn apply), 3 alternated steps of 8 images each (a few seconds)."""
    from fastgraph.cli.main import main

    tmp = tmp_path_factory.mktemp("waterfall")
    model = write_model(tmp, widths=(8, 16, 16, 32))
    js = tmp / "report.json"
    assert main(["optimize", str(model), "--data", data_path, "--mode", "infer", "--batch-size", "8",
                 "--steps", "3", "--profile", "a100", "--precision", "fp16", "--out", str(tmp / "o.pt"),
                 "--json", str(js), "--plot", str(tmp / "cli.png")]) == 0
    with Image.open(tmp / "cli.png") as image:  # `optimize --plot` draws the same waterfall
        assert image.format == "PNG" and image.size == (1320, 605)
    return json.loads(js.read_text())


def test_bars_span_the_roofline_time_of_each_pass(report):
    profile = load_profile("a100")
    images = report["batch_size"]

    def predicted(flops, moved):  # the roofline of one step's forward pass
        return roofline(flops * images, moved * images, profile, "fp16").seconds

    passes = report["passes"]
    assert [p["status"] for p in passes] == ["applied", "applied"]
    ax = waterfall_figure(report).axes[0]
    bars = {p.get_gid(): p for p in ax.patches if p.get_gid()}
    assert list(bars) == ["traced", *(f"pass {i}: {p['name']}" for i, p in enumerate(passes, 1)), "optimized"]
    for i, p in enumerate(passes, start=1):
        bar = bars[f"pass {i}: {p['name']}"]
        assert bar.get_y() == pytest.approx(predicted(p["flops_before"], p["bytes_before"]))
        assert bar.get_y() + bar.get_height() == pytest.approx(predicted(p["flops_after"], p["bytes_after"]))
        assert bar.get_height() < 0  # both passes move fewer bytes: a saving, drawn downwards
    assert bars["traced"].get_height() == pytest.approx(predicted(passes[0]["flops_before"],
                                                                  passes[0]["bytes_before"]))
    assert bars["optimized"].get_height() == pytest.approx(predicted(passes[-1]["flops_after"],
                                                                     passes[-1]["bytes_after"]))
    assert profile.display_name in ax.get_title() and "fp16" in ax.get_title()


def test_measured_panel_shows_the_median_and_every_step(report):
    ax = waterfall_figure(report).axes[1]
    rows = {r["graph"]: r for r in report["roofline"]}
    bars = {p.get_gid(): p for p in ax.patches if p.get_gid()}
    lines = {line.get_gid(): line for line in ax.lines if line.get_gid()}
    for graph in ("before", "after"):
        samples = rows[graph]["measured_step_samples"]
        assert len(samples) == 3
        median = report["measured_step"][graph]["median"]
        assert bars[f"measured {graph}"].get_height() == pytest.approx(median)
        assert sorted(lines[f"samples {graph}"].get_ydata()) == pytest.approx(sorted(samples))
    assert report["measured_step"]["verdict"] in ax.get_title()


def test_png_is_a_real_image_and_a_bad_name_is_one_line(report, tmp_path):
    png = plot_waterfall(report, tmp_path / "waterfall.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1320, 605)  # 12 x 5.5 inches at 110 dpi
        assert np.asarray(image.convert("L")).std() > 10
    with pytest.raises(UserError, match="suffix '.txt'"):
        plot_waterfall(report, tmp_path / "waterfall.txt")


def test_optimize_refuses_a_plot_it_cannot_write_before_any_work(tmp_path, capsys):
    from support import cli_error

    model = write_model(tmp_path, widths=(8, 16, 16, 32))
    line = cli_error(capsys, "optimize", str(model), "--plot", str(tmp_path / "plot"), "--data",
                     str(tmp_path / "no-data"))
    assert "--plot" in line and "no suffix" in line, line  # before the missing data is looked for
