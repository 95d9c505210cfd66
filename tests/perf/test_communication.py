"""The gradient all-reduce model: ring, tree and hierarchical times by hand, the scaling bounds,
gradient bytes of a real model, the interconnect figures of the profiles, and
`fastgraph roofline --gpus N --nodes M` (JSON, an 80-column table, one-line errors)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fastgraph
from fastgraph.cli.main import main
from fastgraph.core.errors import UserError
from fastgraph.core.loading import load_model
from fastgraph.perf.communication import (
    allreduce,
    check_system,
    communication_record,
    gradient_bytes,
    ring_allreduce_seconds,
    ring_reduce_scatter_seconds,
    scaling,
    tree_allreduce_seconds,
)
from fastgraph.perf.roofline import HardwareProfile, list_profiles, load_profile
from support import build_example, cli_error, write_model

MB = 1e6


def system(intra=100e9, intra_latency=2e-6, network=10e9, network_latency=8e-6) -> HardwareProfile:
    """Round numbers: 100 GB/s inside a node, 10 GB/s between nodes (per GPU, per direction)."""
    return HardwareProfile("round", "Round GPU", {"fp32": 1e12}, 1e12, 1, {},
                           intra_node_bandwidth=intra, intra_node_latency=intra_latency,
                           network_bandwidth=network, network_latency=network_latency,
                           intra_node_link="link", network_link="net")


# --------------------------------------------------------------------------- ring by hand


def test_ring_on_one_gpu_costs_nothing():
    assert ring_allreduce_seconds(100 * MB, 1, 100e9, 5e-6) == 0.0
    assert ring_reduce_scatter_seconds(100 * MB, 1, 100e9, 5e-6) == 0.0
    assert allreduce(100 * MB, system(), 1).seconds == 0.0


def test_ring_on_two_and_eight_gpus_by_hand():
    # N = 2: 2 * 1/2 * 100 MB / 100 GB/s = 1 ms, plus 2 * 1 * 5 us
    assert ring_allreduce_seconds(100 * MB, 2, 100e9, 5e-6) == pytest.approx(1e-3 + 10e-6)
    # N = 8: 2 * 7/8 * 100 MB / 100 GB/s = 1.75 ms, plus 2 * 7 * 5 us = 70 us
    assert ring_allreduce_seconds(100 * MB, 8, 100e9, 5e-6) == pytest.approx(1.75e-3 + 70e-6)
    # the reduce-scatter is half of it: 7/8 * 1 ms + 7 * 5 us
    assert ring_reduce_scatter_seconds(100 * MB, 8, 100e9, 5e-6) == pytest.approx(0.875e-3 + 35e-6)


def test_latency_term_alone():
    """Zero bytes leave 2 (N - 1) messages of latency; zero latency leaves the bandwidth term."""
    assert ring_allreduce_seconds(0, 16, 100e9, 3e-6) == pytest.approx(2 * 15 * 3e-6)
    assert ring_allreduce_seconds(100 * MB, 16, 100e9, 0.0) == pytest.approx(2 * 15 / 16 * 1e-3)


def test_bad_link_arguments_raise():
    for args in [(1.0, 0, 1e9, 0.0), (-1.0, 2, 1e9, 0.0), (1.0, 2, 0.0, 0.0), (1.0, 2, 1e9, -1.0)]:
        with pytest.raises(ValueError):
            ring_allreduce_seconds(*args)


# --------------------------------------------------------------------------- hierarchical


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_hierarchical_is_the_flat_ring_on_one_node(gpus):
    hw = system()
    result = allreduce(50 * MB, hw, gpus, 1)
    assert result.algorithm == "ring" and result.inter_node_seconds == 0.0
    assert result.seconds == pytest.approx(ring_allreduce_seconds(50 * MB, gpus, 100e9, 2e-6))


def test_hierarchical_on_four_nodes_of_eight_by_hand():
    hw = system()
    result = allreduce(80 * MB, hw, 32, 4)
    # inside a node: reduce-scatter + all-gather, 2 * (7/8 * 80 MB / 100 GB/s + 7 * 2 us)
    intra = 2 * (7 / 8 * 0.8e-3 + 7 * 2e-6)
    # between nodes: ring all-reduce of 80 MB / 8 over 4 nodes, 2 * 3/4 * 10 MB / 10 GB/s + 6 * 8 us
    inter = 2 * 3 / 4 * 1e-3 + 6 * 8e-6
    assert (result.algorithm, result.gpus_per_node) == ("hierarchical", 8)
    assert result.intra_node_seconds == pytest.approx(intra)
    assert result.inter_node_seconds == pytest.approx(inter)
    assert result.seconds == pytest.approx(intra + inter)


def test_tree_by_hand():
    # 2 x 10 MB / 10 GB/s + 2 x ceil(log2 448) = 18 hops of 8 us
    assert tree_allreduce_seconds(10 * MB, 448, 10e9, 8e-6) == pytest.approx(2e-3 + 18 * 8e-6)
    assert tree_allreduce_seconds(10 * MB, 1, 10e9, 8e-6) == 0.0
    with pytest.raises(ValueError):
        tree_allreduce_seconds(-1.0, 4, 10e9, 0.0)


def test_the_network_stage_takes_the_tree_where_the_rings_latency_dominates():
    hw = system()
    few = allreduce(80 * MB, hw, 32, 4)  # 10 MB per local rank over 4 nodes: the ring's bandwidth wins
    assert few.network_algorithm == "ring"
    many = allreduce(80 * MB, hw, 8 * 448, 448)  # 447 ring hops of 8 us against 9 tree levels
    assert many.network_algorithm == "tree"
    assert many.inter_node_seconds == pytest.approx(tree_allreduce_seconds(10 * MB, 448, 10e9, 8e-6))
    assert many.inter_node_seconds < ring_allreduce_seconds(10 * MB, 448, 10e9, 8e-6)
    assert allreduce(80 * MB, hw, 8, 1).network_algorithm == ""  # one node: no network stage


def test_one_gpu_per_node_is_the_flat_ring_over_the_network():
    result = allreduce(80 * MB, system(), 4, 4)
    assert result.intra_node_seconds == 0.0
    assert result.seconds == pytest.approx(ring_allreduce_seconds(80 * MB, 4, 10e9, 8e-6))


def test_more_nodes_never_reduce_faster():
    times = [allreduce(100 * MB, load_profile("h100"), 8 * m, m).seconds for m in (1, 2, 4, 16, 128)]
    assert times == sorted(times)


# --------------------------------------------------------------------------- scaling bounds


@pytest.mark.parametrize("compute, comm", [(1.0, 0.0), (1.0, 0.25), (1.0, 1.0), (0.01, 0.3), (2e-3, 1e-9)])
def test_scaling_bounds_are_ordered(compute, comm):
    bound = scaling(compute, comm)
    assert 0 < bound.no_overlap_efficiency <= bound.full_overlap_efficiency <= 1.0
    assert bound.no_overlap_seconds == pytest.approx(compute + comm)
    assert bound.full_overlap_seconds == pytest.approx(max(compute, comm))
    assert bound.no_overlap_efficiency == pytest.approx(compute / (compute + comm))


def test_scaling_refuses_a_step_of_no_time():
    with pytest.raises(ValueError):
        scaling(0.0, 1.0)
    with pytest.raises(ValueError):
        scaling(1.0, -1.0)


# --------------------------------------------------------------------------- gradient bytes


def test_gradient_bytes_of_resnet9_are_its_trainable_parameters():
    net = build_example("resnet9.py")
    count = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert 6.5e6 < count < 6.6e6  # "about 6.57M parameters" (examples/resnet9.py)
    assert gradient_bytes(net, "fp32") == count * 4
    assert gradient_bytes(net, "bf16") == gradient_bytes(net, torch.bfloat16) == count * 2
    net.prep[0].weight.requires_grad_(False)  # a frozen layer sends no gradient
    assert gradient_bytes(net, "fp32") == (count - net.prep[0].weight.numel()) * 4


def test_a_shared_parameter_is_reduced_once():
    linear = nn.Linear(4, 4, bias=False)
    assert gradient_bytes([linear.weight, linear.weight], "fp32") == 16 * 4
    with pytest.raises(UserError, match="fp8|float64"):
        gradient_bytes(linear, torch.float64)


# --------------------------------------------------------------------------- profiles


NVLINK_TOTALS = {"v100": 300e9, "a100": 600e9, "h100": 900e9, "h200": 900e9}  # bidirectional, datasheets
NETWORK_BITS = {"v100": 4 * 100e9 / 8, "a100": 200e9, "h100": 400e9, "h200": 400e9}  # per GPU, DGX


@pytest.mark.parametrize("name", list_profiles())
def test_profiles_carry_per_direction_interconnect_figures(name):
    hw = load_profile(name)
    assert 1e-7 < hw.intra_node_latency < 1e-4  # microseconds
    if name in NVLINK_TOTALS:
        assert hw.intra_node_link.startswith("NVLink")
        assert hw.intra_node_bandwidth == pytest.approx(NVLINK_TOTALS[name] / 2)
        assert hw.network_bandwidth == pytest.approx(NETWORK_BITS[name] / 8)
        assert "InfiniBand" in hw.network_link and 1e-7 < hw.network_latency < 1e-4
    else:  # the GTX 1080 Ti: PCIe 3.0 x16, no multi-node system
        assert hw.intra_node_link == "PCIe 3.0 x16" and hw.intra_node_bandwidth == pytest.approx(15.754e9)
        assert hw.network_bandwidth is None and hw.network_latency is None


def test_a_user_profile_needs_a_bandwidth_and_its_latency_together(tmp_path):
    base = ('display_name = "My GPU"\n[memory_bandwidth]\nvalue = 1e12\nsource = "sheet"\n'
            '[sm_count]\nvalue = 10\nsource = "sheet"\n[peak.fp32]\nvalue = 2e13\nsource = "sheet"\n')
    good = tmp_path / "mine.toml"
    good.write_text(base + '[intra_node_bandwidth]\nvalue = 1e11\nlink = "NVLink"\nsource = "sheet"\n'
                           '[intra_node_latency]\nvalue = 1e-6\nsource = "assumption"\n')
    hw = load_profile(str(good))
    assert (hw.intra_node_bandwidth, hw.intra_node_link, hw.network_bandwidth) == (1e11, "NVLink", None)
    bad = tmp_path / "bad.toml"
    bad.write_text(base + '[network_bandwidth]\nvalue = 1e10\nsource = "sheet"\n')
    with pytest.raises(UserError, match="go together"):
        load_profile(str(bad))


@pytest.mark.parametrize("gpus, nodes, message", [
    (0, 1, "gpus must be an integer >= 1"), (8, 0, "nodes must be an integer >= 1"),
    (6, 4, "multiple of nodes"), (2, 2, "no network figure"),
])
def test_systems_that_cannot_be_modelled(gpus, nodes, message):
    with pytest.raises(UserError, match=message):
        check_system(load_profile("gtx1080ti"), gpus, nodes)


@pytest.mark.parametrize("gpus, nodes, least", [(16, 1, 2), (1024, 1, 128), (24, 2, 3)])
def test_more_gpus_than_a_node_holds_need_more_nodes(gpus, nodes, least):
    with pytest.raises(UserError, match=rf"holds at most 8 GPUs: spread them over at least {least} nodes"):
        check_system(load_profile("h100"), gpus, nodes)
    assert check_system(load_profile("h100"), gpus, least) == gpus // least


def test_the_record_adds_up():
    net = build_example("resnet9.py")
    hw = load_profile("h100")
    record = communication_record(net, hw, gpus=16, nodes=2, batch_size=256, compute_seconds=0.01,
                                  gradient_precision="bf16")
    assert record["gradient_bytes"] == gradient_bytes(net, "bf16")
    expected = allreduce(record["gradient_bytes"], hw, 16, 2).seconds
    assert record["allreduce_seconds"] == pytest.approx(expected)
    assert record["global_batch_size"] == 16 * 256
    assert record["images_per_second_full_overlap"] == pytest.approx(16 * 256 / 0.01)  # comm hides
    assert record["images_per_second_no_overlap"] == pytest.approx(
        16 * 256 / (0.01 + record["allreduce_seconds"]))


# --------------------------------------------------------------------------- CLI and API


def run_cli(tmp_path, model, *argv) -> dict:
    """``fastgraph roofline MODEL --batch-size 64 ARGV``; the JSON it wrote."""
    js = tmp_path / "roofline.json"
    assert main(["roofline", str(model), "--out", str(tmp_path / "roofline.png"), "--json", str(js),
                 "--batch-size", "64", *argv]) == 0
    return json.loads(js.read_text())


def test_cli_gpus_and_nodes(tmp_path, capsys):
    model = write_model(tmp_path, (8, 16, 32, 64))
    record = run_cli(tmp_path, model, "--gpus", "32", "--nodes", "4", "--grad-precision", "fp32")
    printed = capsys.readouterr().out
    comm = record["communication"]
    assert comm["gpus"] == 32 and comm["nodes"] == 4 and comm["gpus_per_node"] == 8
    assert comm["algorithm"] == "hierarchical" and comm["gradient_precision"] == "fp32"
    assert comm["network_algorithm"] in ("ring", "tree")
    count = sum(p.numel() for p in load_model(model).parameters() if p.requires_grad)
    assert comm["parameters"] == count and comm["gradient_bytes"] == count * 4
    hw = load_profile("h100")
    assert comm["allreduce_seconds"] == pytest.approx(allreduce(comm["gradient_bytes"], hw, 32, 4).seconds)
    assert comm["compute_seconds"] == pytest.approx(record["step"]["roofline_seconds"])
    assert (comm["scaling_efficiency_no_overlap"] <= comm["scaling_efficiency_full_overlap"] <= 1.0)
    assert comm["images_per_second_no_overlap"] == pytest.approx(
        32 * 64 / (comm["compute_seconds"] + comm["allreduce_seconds"]))
    assert comm["network_link"] == "InfiniBand NDR 400 Gb/s" and comm["network_bandwidth"] == 50e9

    # both tables fold to the 80 columns of a console that is not a terminal, hiding nothing
    lines = [line for line in printed.splitlines() if not line.startswith("Roofline plot written")]
    assert max(map(len, lines)) <= 80, printed
    assert "…" not in printed
    flat = " ".join(printed.split())
    assert "Data-parallel training on 32 x NVIDIA H100" in flat and "all-reduce" in flat
    assert "hierarchical" in flat and "full overlap" in flat and "images/s" in flat


def test_without_gpus_the_output_is_unchanged(tmp_path, capsys):
    model = write_model(tmp_path, (8, 16, 32, 64))
    record = run_cli(tmp_path, model)
    printed = capsys.readouterr().out
    assert "communication" not in record and "Data-parallel" not in printed


def test_api_gpus_nodes(tmp_path):
    net = build_example("resnet9.py")
    roof = fastgraph.roofline(net, profile="a100", batch_size=128, gpus=8)
    comm = roof.to_dict()["communication"]
    assert (comm["algorithm"], comm["nodes"], comm["gradient_precision"]) == ("ring", 1, "bf16")
    assert comm["network_algorithm"] is None
    assert comm["gradient_bytes"] == gradient_bytes(net, "bf16")
    assert comm["intra_node_link"] == "NVLink 3" and comm["network_link"] is None
    assert "Data-parallel training on 8 x NVIDIA A100" in " ".join(str(roof).split())
    assert "communication" not in fastgraph.roofline(net, profile="a100", batch_size=128).to_dict()


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0"], "gpus must be an integer >= 1"),
    (["--gpus", "8", "--nodes", "0"], "nodes must be an integer >= 1"),
    (["--gpus", "-4"], "gpus must be an integer >= 1"),
    (["--gpus", "8", "--nodes", "3"], "multiple of nodes"),
    (["--gpus", "8", "--nodes", "2", "--profile", "gtx1080ti", "--precision", "fp32"], "no network figure"),
    (["--nodes", "2"], "need --gpus"),
    (["--gpus", "8", "--mode", "infer"], "training step"),
    (["--gpus", "8", "--grad-precision", "fp8"], "unknown precision"),
])
def test_bad_systems_are_one_line_errors(tmp_path, capsys, argv, message):
    model = write_model(tmp_path, (8, 16, 32, 64))
    line = cli_error(capsys, "roofline", str(model), "--out", str(tmp_path / "r.png"), *argv)
    assert message in line
