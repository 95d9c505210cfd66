"""`fastgraph roofline`: a PNG that decodes, JSON with one entry per graph node that adds up to
FlopCounterMode's count, the roofline bound at each node's intensity, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx
from PIL import Image

from fastgraph.cli.main import main
from fastgraph.core.loading import load_model
from fastgraph.perf.roofline import count_flops, load_profile, node_costs
from support import EXAMPLES, cli_error

MODEL = EXAMPLES / "resnet20.py"


def roofline(tmp_path, *argv) -> tuple[dict, object]:
    png, js = tmp_path / "roofline.png", tmp_path / "roofline.json"
    assert main(["roofline", str(MODEL), "--out", str(png), "--json", str(js), *argv]) == 0
    return json.loads(js.read_text()), png


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_png_and_one_json_entry_per_node(tmp_path, mode):
    record, png = roofline(tmp_path, "--profile", "h100", "--precision", "bf16", "--mode", mode,
                           "--batch-size", "256")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1210, 770)  # 11 x 7 inches at 110 dpi
        image.verify()
    assert png.stat().st_size > 20_000  # a drawn plot, not an empty canvas

    gm = fx.symbolic_trace(load_model(MODEL))
    x = torch.zeros(2, 3, 32, 32)
    moving = [c.name for c in node_costs(gm, x) if c.flops > 0 or c.bytes > 0]
    nodes = record["nodes"]
    assert [n["name"] for n in nodes] == moving  # every node that computes or moves data, in order
    calls = {n.name: n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert all(n["label"] == calls.get(n["name"], n["name"]) for n in nodes)

    flops = count_flops(gm, x)
    per_image = flops.train if mode == "train" else flops.forward
    assert record["step"]["flops"] == pytest.approx(per_image * 256, rel=1e-9)
    hw = load_profile("h100")
    peak, bandwidth = hw.peak("bf16"), hw.memory_bandwidth
    assert record["ridge_point"] == pytest.approx(peak / bandwidth)
    for n in nodes:
        assert n["bytes"] > 0
        assert n["arithmetic_intensity"] == pytest.approx(n["flops"] / n["bytes"])
        attainable = min(peak, bandwidth * n["arithmetic_intensity"])
        assert n["attainable_flops_per_second"] == pytest.approx(attainable)
        assert n["roofline_seconds"] == pytest.approx(max(n["flops"] / peak, n["bytes"] / bandwidth))
    convs = [n for n in nodes
             if n["op"] == "call_module" and isinstance(gm.get_submodule(n["label"]), torch.nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in gm.modules())
    assert all(n["flops"] > 0 for n in convs)


def test_training_moves_more_than_inference_per_node(tmp_path):
    train, _ = roofline(tmp_path, "--mode", "train")
    infer, _ = roofline(tmp_path, "--mode", "infer")
    # a conv on the gradient path: forward, input gradient, weight gradient
    by_name = {n["name"]: n for n in infer["nodes"]}
    for n in train["nodes"]:
        assert n["flops"] >= by_name[n["name"]]["flops"] and n["bytes"] > by_name[n["name"]]["bytes"]


def test_bad_input_is_one_line(tmp_path, capsys):
    assert "unknown hardware profile" in cli_error(capsys, "roofline", str(MODEL), "--profile", "tpu9")
    assert "tf32" in cli_error(capsys, "roofline", str(MODEL), "--profile", "v100", "--precision", "tf32")
    missing = tmp_path / "none.json"
    line = cli_error(capsys, "roofline", str(MODEL), "--measured", str(missing))
    assert str(missing) in line
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in cli_error(capsys, "roofline", str(MODEL), "--measured", str(bad))


def test_the_input_shape_sets_the_counts(tmp_path):
    """The step is counted at ``--input-shape``: FlopCounterMode's count of the model at that shape."""
    record, _ = roofline(tmp_path, "--input-shape", "3,64,48", "--batch-size", "4", "--mode", "infer")
    gm = fx.symbolic_trace(load_model(MODEL))
    wide, cifar = count_flops(gm, torch.zeros(2, 3, 64, 48)), count_flops(gm, torch.zeros(2, 3, 32, 32))
    assert record["input_shape"] == [3, 64, 48]
    assert record["step"]["flops"] == pytest.approx(wide.forward * 4, rel=1e-9)
    assert 2.9 < wide.forward / cifar.forward < 3.0  # 3x the pixels; the head's FLOPs do not grow


def test_input_shape_errors_are_one_line(capsys):
    from fastgraph.core.errors import UserError
    from fastgraph.perf.record import roofline as roofline_api

    assert "C,H,W" in cli_error(capsys, "roofline", str(MODEL), "--input-shape", "224,224")
    # a measured profile is of CIFAR-10 steps: its times cannot sit beside counts at another shape
    with pytest.raises(UserError, match="3x32x32"):
        roofline_api(MODEL, measured={"batch_size": 4, "rows": []}, input_shape=(3, 64, 64))
