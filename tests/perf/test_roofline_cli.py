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


@pytest.mark.parametrize("record, says", [
    ({"rows": [{"node": "conv1"}], "batch_size": "eight"}, "batch_size must be a whole number"),
    ({"rows": [{"node": "conv1", "seconds": "fast"}], "batch_size": 8}, "rows[0] (conv1): seconds"),
    ({"rows": [{"seconds": 0.1}], "batch_size": 8}, "rows[0] has no node name"),
    ({"rows": [], "batch_size": 8, "step_seconds": -1}, "step_seconds must be a number > 0"),
])
def test_a_malformed_measured_profile_is_one_line(tmp_path, capsys, record, says):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(record))
    png = tmp_path / "r.png"
    line = cli_error(capsys, "roofline", str(MODEL), "--measured", str(path), "--out", str(png))
    assert str(path) in line and says in line, line


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


def _measured(device: str, on_profile: bool) -> dict:
    """A `fastgraph profile --json` record of 8-image steps, timing two of resnet20's nodes."""
    return {"batch_size": 8, "device": device, "profile": "h100", "measured_on_profile": on_profile,
            "step_seconds": 0.25,
            "rows": [{"node": "conv1", "seconds": 5e-4}, {"node": "fc", "seconds": 2e-4}]}


def test_an_explicit_batch_size_that_is_not_the_measured_one_is_refused():
    from fastgraph.core.errors import UserError
    from fastgraph.perf.record import roofline as roofline_api

    with pytest.raises(UserError, match="--batch-size 256 is not the 8 images per step"):
        roofline_api(MODEL, measured=_measured("cpu", False), batch_size=256)
    assert roofline_api(MODEL, measured=_measured("cpu", False), batch_size=8).batch_size == 8
    assert roofline_api(MODEL, measured=_measured("cpu", False)).batch_size == 8  # none given: the profile's
    assert roofline_api(MODEL, mode="infer").batch_size == 512


def test_no_share_of_a_gpu_s_roof_from_a_run_on_another_device():
    from fastgraph.perf.record import roofline as roofline_api

    cpu = roofline_api(MODEL, profile="h100", measured=_measured("cpu", False))
    timed = [n for n in cpu.nodes if "measured_seconds" in n]
    assert len(timed) == 2 and all(n["fraction_of_attainable"] is None for n in timed)
    text = str(cpu)
    assert "% roof" not in text and "share of the roof" not in text
    line = "Measured on cpu, not on NVIDIA H100 SXM5 80GB: no share of its roof is given."
    assert line in " ".join(text.split())
    gpu = roofline_api(MODEL, profile="h100", measured=_measured("NVIDIA H100 80GB HBM3", True))
    conv1 = next(n for n in gpu.nodes if n["label"] == "conv1")
    assert conv1["fraction_of_attainable"] == pytest.approx(
        conv1["achieved_flops_per_second"] / conv1["attainable_flops_per_second"])
    assert "% roof" in str(gpu) and "Measured on" not in str(gpu)
    # measured on an H100 but held against an A100's roof: no share either
    a100 = roofline_api(MODEL, profile="a100", measured=_measured("NVIDIA H100 80GB HBM3", True))
    assert all(n.get("fraction_of_attainable") is None for n in a100.nodes)
