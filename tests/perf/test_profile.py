"""`fastgraph profile` on the CPU with real CIFAR-10: a Chrome trace whose ranges are the graph's
module calls, one table row per module with forward and backward time, the FLOPs model, and
the profile's JSON feeding `fastgraph roofline --measured`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx

from fastgraph.cli.main import main
from fastgraph.core.loading import load_model
from fastgraph.perf.roofline import count_flops
from support import cli_error, write_model

BATCH = 16


@pytest.fixture
def narrow(tmp_path):
    """examples/resnet9.py at an eighth of the width."""
    return write_model(tmp_path, (8, 16, 32, 64), "narrow_resnet9.py")


def test_cpu_profile_attributes_time_to_every_module_call(tmp_path, narrow, data_path, one_thread, capsys):
    out, js = tmp_path / "profile", tmp_path / "profile.json"
    assert main(["profile", str(narrow), "--steps", "2", "--warmup", "1", "--batch-size", str(BATCH),
                 "--out", str(out), "--json", str(js), "--data", data_path]) == 0
    printed = capsys.readouterr().out
    record = json.loads(js.read_text())
    gm = fx.symbolic_trace(load_model(narrow))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]

    # The Chrome trace holds one range per module call per profiled step, named by the module path.
    trace = json.loads((out / "trace.json").read_text())
    annotations = [e["name"] for e in trace["traceEvents"] if e.get("cat") == "user_annotation"]
    assert all(annotations.count(name) == 2 for name in calls)
    assert {"step", "data", "forward", "backward", "optimizer"} <= set(annotations)

    # One row per module call, in graph order; convolutions have forward and backward time
    # (the backward found through the profiler's sequence numbers) and their FLOPs.
    rows = record["rows"]
    assert [r["node"] for r in rows] == calls
    by_node = {r["node"]: r for r in rows}
    convs = [t for t in calls if isinstance(gm.get_submodule(t), torch.nn.Conv2d)]
    for name in convs:
        assert by_node[name]["forward_seconds"] > 0 and by_node[name]["backward_seconds"] > 0
        assert by_node[name]["flops"] > 0 and by_node[name]["achieved_flops_per_second"] > 0
    assert all(r["flops"] == 0 for r in rows if r["node"] not in convs + ["linear"])
    # FLOPs per step: the per-node model adds up to FlopCounterMode's count of a training step.
    x = torch.zeros(2, 3, 32, 32)
    assert sum(r["flops"] for r in rows) == pytest.approx(count_flops(gm, x).train * BATCH, rel=1e-9)
    # the first conv reads the images, which need no gradient: 2x its forward FLOPs, the others 3x
    first, second = by_node[convs[0]]["flops"], by_node[convs[1]]["flops"]
    forward = _forward_flops(gm, x)
    assert first == pytest.approx(2 * forward[convs[0]] * BATCH)
    assert second == pytest.approx(3 * forward[convs[1]] * BATCH)

    step = record["step_seconds"]
    assert step > 0 and 0 < record["nodes_seconds"] <= step
    assert set(record["phases"]) == {"step", "data", "forward", "backward", "optimizer"}
    assert record["phases"]["forward"] + record["phases"]["backward"] <= step
    assert record["device"] == "cpu" and record["nvtx_backend"] == "none"
    assert record["nsys_command"].startswith("nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi")
    assert "--nsys" in record["nsys_command"] and str(narrow) in record["nsys_command"]
    assert "layer1.0.0" in printed and "nsys profile" in printed
    _fits_80_columns(printed)

    # The profile's JSON places measured points on the roofline, one per node it timed.
    png, rl = tmp_path / "measured.png", tmp_path / "measured.json"
    assert main(["roofline", str(narrow), "--precision", "fp32", "--measured", str(js), "--out", str(png),
                 "--json", str(rl)]) == 0
    roof = json.loads(rl.read_text())
    _fits_80_columns(capsys.readouterr().out)  # the 11-column measured table included
    assert roof["batch_size"] == BATCH
    measured = {n["label"]: n for n in roof["nodes"] if "measured_seconds" in n}
    assert set(measured) == set(calls)
    for name in convs:
        achieved = by_node[name]["achieved_flops_per_second"]
        assert measured[name]["achieved_flops_per_second"] == pytest.approx(achieved)
    assert roof["step"]["measured_seconds"] == pytest.approx(step)


def _fits_80_columns(printed: str) -> None:
    """The tables fold to the 80 columns of a console that is not a terminal, hiding nothing;
    only the lines that name a file or a command to copy run long."""
    table = [line for line in printed.splitlines() if "/" not in line or "│" in line]
    assert table and max(map(len, table)) <= 80, printed
    assert "…" not in printed


def _forward_flops(gm, x):
    from fastgraph.perf.roofline import node_costs

    return {c.target: c.flops for c in node_costs(gm, x) if c.op == "call_module"}


def test_bad_options_are_one_line_errors(narrow, data_path, capsys):
    line = cli_error(capsys, "profile", str(narrow), "--nsys", "--device", "cpu", "--data", data_path)
    assert "--nsys" in line and "CUDA" in line
    assert "--steps" in cli_error(capsys, "profile", str(narrow), "--steps", "0", "--data", data_path)
    assert "unknown hardware profile" in cli_error(capsys, "profile", str(narrow), "--profile", "tpu9",
                                                    "--data", data_path)


def test_a_cpu_run_is_never_held_against_a_gpu_peak(tmp_path, data_path, capsys):
    """A share of an H100's peak next to a CPU measurement says nothing: the column and
    the share are left out, and the report says why."""
    from fastgraph.cli.main import main
    from support import write_model

    model = write_model(tmp_path, (8, 16, 32, 64), "tiny_resnet9.py")
    js = tmp_path / "profile.json"
    assert main(["profile", str(model), "--data", data_path, "--steps", "1", "--warmup", "0",
                 "--batch-size", "4", "--out", str(tmp_path / "trace"), "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "peak" not in printed.split("Model FLOPs per step")[0]  # no column of shares
    assert "not on the h100 profile: no share of its peak" in " ".join(printed.split())  # wrapped at 80
    import json

    record = json.loads(js.read_text())
    assert record["measured_on_profile"] is False
    assert all(r["fraction_of_peak"] is None for r in record["rows"])
