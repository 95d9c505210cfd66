"""What people read: optimize's tables fit an 80-column terminal, the roofline plot's
labels do not collide, and export's verification runs in batches."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from rich.console import Console

from fastgraph.cli.main import main
from fastgraph.compiler.report import print_optimize_report
from support import EXAMPLES

MODELS = EXAMPLES.parent / "tests" / "models"


@pytest.fixture(scope="module")
def optimize_report(tmp_path_factory, data_path) -> dict:
    """The JSON of a real `fastgraph optimize` of examples/resnet9.py in infer mode (two passes)."""
    tmp = tmp_path_factory.mktemp("optimize")
    js = tmp / "report.json"
    torch.manual_seed(0)
    argv = ["optimize", str(EXAMPLES / "resnet9.py"), "--data", data_path, "--mode", "infer",
            "--batch-size", "8", "--steps", "1", "--out", str(tmp / "opt.pt"), "--json", str(js)]
    assert main(argv) == 0
    return json.loads(js.read_text())


@pytest.mark.parametrize("width", [80, 100])
def test_optimize_tables_fit_the_terminal_and_hide_no_number(optimize_report, width):
    buf = io.StringIO()
    print_optimize_report(optimize_report, Console(width=width, file=buf))
    text = buf.getvalue()
    # Paths and pass messages are printed unbroken, for copying; everything else fits.
    lines = [line for line in text.splitlines() if " written to " not in line and not line.startswith("  ")]
    assert max(map(len, lines)) <= width
    assert "…" not in text and "..." not in text
    cells = set(re.findall(r"[^\s│┃]+", text))
    numbers = [f"{p['rewrites']}" for p in optimize_report["passes"]]
    numbers += [f"{r['measured_images_per_second']:.4g}" for r in optimize_report["roofline"]]
    numbers += [f"{r['arithmetic_intensity']:.3g}" for r in optimize_report["roofline"]]
    assert all(n in cells for n in numbers), (numbers, text)  # whole, not folded or dropped
    for header in ("rewrites", "FLOP/B", "img/s", "FLOP/s"):
        assert header in text
    # A long pass name may fold within its column, but all of it is there.
    first_column = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│"))
    assert all(p["name"] in first_column for p in optimize_report["passes"])


def test_roofline_labels_do_not_collide_and_name_the_costliest(tmp_path):
    from fastgraph.core.loading import load_model
    from fastgraph.core.tracing import trace
    from fastgraph.perf.plot import LABELLED, plot_roofline, roofline_figure
    from fastgraph.perf.record import roofline_record
    from fastgraph.perf.roofline import load_profile

    model = MODELS / "resnet50.py"
    profile = load_profile("h100")
    record = roofline_record(trace(load_model(str(model), "build_model"), str(model)), profile, "bf16",
                             "train", 256, None)
    kwargs = {"profile": profile, "precision": "bf16", "points": record["nodes"], "step": record["step"],
              "title": "resnet50.py: train step of 256 images on H100, bf16"}
    png = plot_roofline(tmp_path / "resnet50.png", **kwargs)
    assert png.stat().st_size > 0

    fig = roofline_figure(**kwargs)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    node_labels = {n["label"] for n in record["nodes"]}
    texts = [t for t in fig.axes[0].texts if t.get_text() in node_labels]
    assert 3 <= len(texts) <= LABELLED
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
    drawn = [n for n in record["nodes"] if n["arithmetic_intensity"] > 0]
    costliest = max(drawn, key=lambda n: n["roofline_seconds"])
    assert costliest["label"] in {t.get_text() for t in texts}


def test_export_verification_runs_in_batches_and_prints_nothing_off_a_terminal(capsys):
    from fastgraph.deploy.batches import pytorch_logits, run_in_batches

    calls = []

    class Counted(torch.nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return x.flatten(1)[:, :10]

    images = torch.randn(1201, 3, 4, 4)
    logits = pytorch_logits(Counted(), images, torch.device("cpu"), chunk=500)
    assert calls == [500, 500, 201] and torch.equal(logits, images.flatten(1)[:, :10])
    calls.clear()
    fixed = run_in_batches(Counted(), images[:70], batch=32)  # a fixed-batch engine: last one padded
    assert calls == [32, 32, 32] and torch.equal(fixed, images[:70].flatten(1)[:, :10])
    assert capsys.readouterr() == ("", "")


def test_a_bar_inside_a_live_display_stays_silent(monkeypatch, capsys):
    """On a terminal, the pass checks' bar inside training's epoch bar would redraw over it
    (and two of rich's live displays on one console raise): only the outermost draws."""
    from fastgraph.core.console import progress
    from fastgraph.training.recipes import load_recipe
    from fastgraph.training.report import RichReporter

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich treats stdout and stderr as terminals
    with progress("outer", total=2) as outer:
        with progress("inner", total=2) as inner:
            inner(advance=1)
        outer(advance=1)
    err = capsys.readouterr().err
    assert "outer" in err and "inner" not in err

    with RichReporter(load_recipe("page2019"), Console(file=io.StringIO(), force_terminal=True)):
        with progress("pass checks", total=1) as update:
            update(advance=1)
    assert "pass checks" not in capsys.readouterr().err


def test_train_help_names_every_shipped_recipe(capsys):
    """``fastgraph train --help`` lists the recipes read from the package, not a list that
    falls behind when one is added."""
    from fastgraph.training.recipes import shipped_recipes

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    recipes = shipped_recipes()
    assert {"page2019", "resnet50_ffcv16", "resnet20_seed_best"} <= set(recipes)
    for name in recipes:
        assert name in text, name
