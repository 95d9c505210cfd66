"""Roofline: hardware profiles, FLOP counts against hand counts, bytes, and the max/bound logic.

FLOP and byte counts depend on shapes only, so the example inputs here are random
tensors of CIFAR-10's shape; the models are the plain example files users write.
"""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

from fastgraph.core.errors import ModelError, UserError
from fastgraph.perf.roofline import (
    PRECISIONS,
    HardwareProfile,
    count_flops,
    efficiency,
    estimate,
    inference_roofline,
    list_profiles,
    load_profile,
    mfu,
    node_costs,
    roofline,
    step_bytes,
    training_roofline,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_NAMES = ("resnet9", "resnet20", "preact_resnet20")


def build(name: str) -> nn.Module:
    return runpy.run_path(str(EXAMPLES / f"{name}.py"))["build_model"]()


def macs_conv(h_out, w_out, c_in, c_out, k=3):
    return h_out * w_out * c_out * c_in * k * k


# ResNet-9 (Page) by hand: each conv is 3x3, padding 1, so H_out = H_in; MACs of a conv
# are H_out*W_out*C_out*C_in*k*k, FLOPs = 2*MACs. BN, ReLU, pooling and the final *0.125
# are not multiply-accumulates and FlopCounterMode counts them as 0.
RESNET9_PREP_MACS = macs_conv(32, 32, 3, 64)                     # prep        1,769,472
RESNET9_MACS = (
    RESNET9_PREP_MACS
    + macs_conv(32, 32, 64, 128)                                 # layer1 conv 75,497,472
    + 2 * macs_conv(16, 16, 128, 128)                            # residual    75,497,472
    + macs_conv(16, 16, 128, 256)                                # layer2      75,497,472
    + macs_conv(8, 8, 256, 512)                                  # layer3      75,497,472
    + 2 * macs_conv(4, 4, 512, 512)                              # residual    75,497,472
    + 512 * 10                                                   # linear           5,120
)
RESNET9_FORWARD_FLOPS = 2 * RESNET9_MACS                         # 758,523,904 per image


@pytest.fixture(scope="module")
def resnet9():
    return build("resnet9")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet9_flops(resnet9, images):
    return count_flops(resnet9, images)


# --------------------------------------------------------------------------- FLOPs


def test_resnet9_forward_flops_match_hand_count(resnet9_flops):
    flops = resnet9_flops
    assert flops.batch_size == 2
    assert flops.forward == pytest.approx(RESNET9_FORWARD_FLOPS, rel=0.02)


def test_resnet9_train_flops_are_about_three_times_forward(resnet9_flops):
    # Backward of a conv/linear computes the input gradient and the weight gradient,
    # each as costly as the forward: train ~ 3x forward. The first conv needs no input
    # gradient (the images do not require grad), so it is slightly under 3x.
    flops = resnet9_flops
    assert 2.9 <= flops.train / flops.forward < 3.0
    assert flops.train == pytest.approx(3 * RESNET9_FORWARD_FLOPS - 2 * RESNET9_PREP_MACS, rel=1e-9)


def test_count_flops_leaves_the_module_untouched(resnet9, images):
    model = build("resnet9").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_flops(model, images)
    assert model.training
    for key, value in model.state_dict().items():  # BN running stats, counters, weights
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_count_flops_inside_inference_mode_does_not_return_zero(resnet9, resnet9_flops):
    outside = resnet9_flops
    with torch.inference_mode():
        example = torch.randn(2, 3, 32, 32)  # an inference tensor
        inside = count_flops(resnet9, example)
        costs = node_costs(torch.fx.symbolic_trace(resnet9), example)
    assert inside.forward == outside.forward == RESNET9_FORWARD_FLOPS
    assert inside.train == outside.train > 0
    assert sum(c.flops for c in costs) == RESNET9_FORWARD_FLOPS


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_node_costs_total_equals_count_flops(name, images):
    model = build(name)
    gm = torch.fx.symbolic_trace(model)
    costs = node_costs(gm, images)
    assert [c.name for c in costs] == [n.name for n in gm.graph.nodes]
    assert sum(c.flops for c in costs) == count_flops(model, images).forward > 0
    convs = {n.name for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(gm.get_submodule(n.target), nn.Conv2d)}
    assert convs and all(c.flops > 0 for c in costs if c.name in convs)


def test_node_costs_bytes_by_hand(resnet9, images):
    gm = torch.fx.symbolic_trace(resnet9)
    costs = {c.name: c for c in node_costs(gm, images, batch_size=512)}
    conv = costs["prep_0"]  # 3x32x32 -> 64x32x32, weight 64x3x3x3, fp32
    assert (conv.op, conv.target) == ("call_module", "prep.0")
    assert conv.flops == 2 * RESNET9_PREP_MACS
    assert conv.activation_bytes == 4 * (3 * 32 * 32 + 64 * 32 * 32)
    assert conv.parameter_bytes == 4 * 64 * 3 * 3 * 3
    assert conv.bytes == conv.activation_bytes + conv.parameter_bytes / 512
    assert conv.arithmetic_intensity == conv.flops / conv.bytes
    bn = costs["prep_1"]  # eval BN reads weight, bias, running mean and var: 4 x 64 floats
    assert bn.parameter_bytes == 4 * 4 * 64 and bn.flops == 0
    relu = costs["prep_2"]  # in place: still reads and writes the map
    assert relu.activation_bytes == 2 * 4 * 64 * 32 * 32
    assert costs["flatten"].bytes == 0  # a view moves nothing
    half = {c.name: c for c in node_costs(gm, images, batch_size=512, precision="fp16")}
    assert half["prep_0"].activation_bytes == conv.activation_bytes / 2
    assert half["prep_0"].parameter_bytes == conv.parameter_bytes / 2


def test_node_costs_reports_a_failing_graph_in_one_line(resnet9):
    gm = torch.fx.symbolic_trace(resnet9)
    with pytest.raises(ModelError) as err:
        node_costs(gm, torch.randn(2, 4, 32, 32))  # 4 channels into a 3-channel conv
    assert "\n" not in str(err.value)


def test_step_bytes_by_hand():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3, bias=False)))
    x = torch.randn(5, 4)
    # forward activations per image: read 4 + write 3 floats = 28 bytes; weight 12 floats = 48 bytes.
    # 3 * 28 + (2 * 48 + 48 * (4 + 2 * 1)) / 8 = 84 + 384 / 8 = 132
    assert step_bytes(gm, x, "fp32", batch_size=8, optimizer_states=1) == 132
    assert step_bytes(gm, x, "bf16", batch_size=8, optimizer_states=1) == 66
    # Adam keeps 2 states: 84 + (96 + 48 * 8) / 8 = 144
    assert step_bytes(gm, x, "fp32", batch_size=8, optimizer_states=2) == 144


# --------------------------------------------------------------------------- profiles


def test_the_five_profiles_ship():
    assert list_profiles() == ["a100", "gtx1080ti", "h100", "h200", "v100"]


@pytest.mark.parametrize("name", ["v100", "gtx1080ti", "a100", "h100", "h200"])
def test_profile_loads_with_a_source_for_every_number(name):
    hw = load_profile(name)
    assert hw.name == name and hw.display_name.startswith("NVIDIA")
    assert hw.memory_bandwidth > 1e11 and hw.sm_count > 0 and "fp32" in hw.peak_flops
    keys = {"memory_bandwidth", "sm_count"} | {f"peak.{p}" for p in hw.peak_flops}
    rates = keys | {"intra_node_bandwidth"} | ({"network_bandwidth"} if hw.network_bandwidth else set())
    latencies = {k.replace("bandwidth", "latency") for k in rates - keys}
    assert set(hw.sources) == rates | latencies
    assert all("https://" in hw.sources[k] for k in rates)
    assert all(hw.sources[k].startswith("assumption") for k in latencies)  # no datasheet gives one
    for precision in ("tf32", "fp16", "bf16"):  # tensor cores beat CUDA cores where present
        if precision in hw.peak_flops and name != "gtx1080ti":
            assert hw.peak(precision) > hw.peak("fp32")


def test_profile_precisions_are_the_hardwares():
    assert set(load_profile("v100").peak_flops) == {"fp32", "fp16"}
    assert set(load_profile("gtx1080ti").peak_flops) == {"fp32", "fp16"}
    for name in ("a100", "h100", "h200"):
        assert set(load_profile(name).peak_flops) == set(PRECISIONS)
    # the H200 is the H100's compute with faster memory
    h100, h200 = load_profile("h100"), load_profile("h200")
    assert h200.peak("bf16") == pytest.approx(h100.peak("bf16"), rel=0.001)
    assert h200.memory_bandwidth > h100.memory_bandwidth


def test_gtx1080ti_fp16_runs_at_one_64th_of_fp32():
    hw = load_profile("gtx1080ti")
    assert hw.peak("fp16") == pytest.approx(hw.peak("fp32") / 64, rel=1e-9)


def test_missing_precision_is_a_one_line_user_error():
    with pytest.raises(UserError) as err:
        load_profile("v100").peak("tf32")
    message = str(err.value)
    assert "\n" not in message and "tf32" in message and "fp32, fp16" in message


def test_unknown_profile_is_a_one_line_user_error_listing_the_known_ones():
    with pytest.raises(UserError) as err:
        load_profile("tpu-v5")
    message = str(err.value)
    assert "\n" not in message and "tpu-v5" in message
    assert all(name in message for name in list_profiles())
    with pytest.raises(UserError, match="known: fp32, tf32, fp16, bf16"):
        load_profile("a100").peak("fp8")


def test_profile_from_a_user_toml(tmp_path):
    good = tmp_path / "mygpu.toml"
    good.write_text('display_name = "My GPU"\n'
                    '[memory_bandwidth]\nvalue = 1e12\nsource = "spec sheet"\n'
                    '[sm_count]\nvalue = 10\nsource = "spec sheet"\n'
                    '[peak.fp32]\nvalue = 2e13\nsource = "spec sheet"\n')
    hw = load_profile(str(good))
    assert (hw.name, hw.peak("fp32"), hw.ridge_point("fp32")) == ("mygpu", 2e13, 20.0)
    bad = tmp_path / "nosource.toml"
    bad.write_text(good.read_text().replace('source = "spec sheet"\n[sm_count]', "[sm_count]"))
    with pytest.raises(UserError, match=r"\[memory_bandwidth\] needs a 'source'"):
        load_profile(str(bad))


# --------------------------------------------------------------------------- roofline


def round_profile() -> HardwareProfile:
    """100 TFLOP/s fp16, 1 TB/s: ridge point 100 FLOPs/byte."""
    return HardwareProfile("round", "Round numbers", {"fp16": 100e12}, 1e12, 1, {})


def test_roofline_compute_bound_by_hand():
    r = roofline(2e12, 1e10, round_profile(), "fp16")
    assert r.compute_seconds == pytest.approx(0.02) and r.memory_seconds == pytest.approx(0.01)
    assert r.seconds == r.compute_seconds and r.bound == "compute"
    assert r.arithmetic_intensity == pytest.approx(200) and r.ridge_point == pytest.approx(100)


def test_roofline_memory_bound_by_hand():
    r = roofline(1e12, 5e10, round_profile(), "fp16")
    assert r.compute_seconds == pytest.approx(0.01) and r.memory_seconds == pytest.approx(0.05)
    assert r.seconds == r.memory_seconds and r.bound == "memory"
    assert r.arithmetic_intensity == pytest.approx(20)
    with pytest.raises(ValueError):
        roofline(-1, 1, round_profile(), "fp16")


def test_training_roofline_is_the_counts_times_the_images(resnet9, images, resnet9_flops):
    gm = torch.fx.symbolic_trace(resnet9)
    hw = load_profile("v100")
    one = training_roofline(gm, images, hw, "fp16", epochs=1)
    ten = training_roofline(gm, images, "v100", "fp16", epochs=10)
    assert ten.seconds == pytest.approx(10 * one.seconds, rel=1e-9)
    images_seen = 10 * 50_000
    assert ten.flops == resnet9_flops.train * images_seen
    assert ten.bytes == pytest.approx(step_bytes(gm, images, "fp16") * images_seen, rel=1e-12)
    assert ten.compute_seconds == pytest.approx(ten.flops / 125e12)
    with pytest.raises(UserError):
        training_roofline(gm, images, hw, "bf16", epochs=1)  # V100 has no bf16


def test_inference_roofline_is_the_node_sums(resnet9, images):
    gm = torch.fx.symbolic_trace(resnet9)
    r = inference_roofline(gm, images, "a100", "fp16", images=10_000, batch_size=500)
    costs = node_costs(gm, images, batch_size=500, precision="fp16")
    assert r.flops == RESNET9_FORWARD_FLOPS * 10_000
    assert r.bytes == pytest.approx(sum(c.bytes for c in costs) * 10_000, rel=1e-12)
    assert r.seconds == max(r.flops / 312e12, r.bytes / 2039e9)


def test_efficiency_and_mfu_by_hand():
    assert efficiency(measured_seconds=4.0, roofline_seconds=1.0) == 0.25
    # 50 TFLOPs in 1 s on a 100 TFLOP/s part: MFU 0.5
    assert mfu(50e12, 1.0, round_profile(), "fp16") == pytest.approx(0.5)
    assert math.isclose(mfu(312e12, 2.0, "a100", "bf16"), 0.5)
    with pytest.raises(ValueError):
        efficiency(0.0, 1.0)


def test_estimate_rows_for_the_optimize_report(resnet9, images, resnet9_flops):
    gm = torch.fx.symbolic_trace(resnet9)
    train = estimate(gm, images, "h100", "bf16", mode="train", epochs=2, batch_size=256)
    assert train["images"] == 100_000 and train["step_flops_per_image"] == resnet9_flops.train
    assert train["step_bytes_per_image"] == pytest.approx(
        step_bytes(gm, images, "bf16", batch_size=256), rel=1e-12)
    assert train["roofline_seconds"] == max(train["compute_seconds"], train["memory_seconds"])
    infer = estimate(gm, images, "h100", "bf16", mode="infer")
    assert infer["images"] == 10_000 and infer["step_flops_per_image"] == RESNET9_FORWARD_FLOPS
    assert infer["bound"] in ("compute", "memory") and infer["profile"] == "h100"
    with pytest.raises(UserError, match="mode"):
        estimate(gm, images, "h100", "bf16", mode="eval")
