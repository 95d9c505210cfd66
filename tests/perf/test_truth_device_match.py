"""A GPU is held against a hardware profile's peak only when the profile is that part: the
names torch reports for the SXM parts match their profiles, while a PCIe or NVL card, or
another memory size, is not taken for them (their peaks and bandwidths are lower)."""

from __future__ import annotations

import pytest

from fastgraph.perf.record import measured_on_profile
from fastgraph.perf.roofline import load_profile

# torch.cuda.get_device_name() of each part
SAME = [("h100", "NVIDIA H100 80GB HBM3"), ("a100", "NVIDIA A100-SXM4-80GB"), ("h200", "NVIDIA H200"),
        ("v100", "Tesla V100-SXM2-16GB"), ("v100", "Tesla V100-SXM2-32GB"),
        ("gtx1080ti", "NVIDIA GeForce GTX 1080 Ti")]
OTHER = [("h100", "NVIDIA H100 PCIe"), ("h100", "NVIDIA H100 NVL"), ("a100", "NVIDIA A100-SXM4-40GB"),
         ("a100", "NVIDIA A100 80GB PCIe"), ("a100", "NVIDIA A100-PCIE-40GB"), ("h200", "NVIDIA H200 NVL"),
         ("v100", "Tesla V100-PCIE-32GB"), ("a100", "NVIDIA H100 80GB HBM3"), ("h100", "cpu")]


@pytest.mark.parametrize(("profile", "device"), SAME)
def test_the_profiles_own_part_is_described(profile, device):
    assert load_profile(profile).describes(device)


@pytest.mark.parametrize(("profile", "device"), OTHER)
def test_another_variant_is_not_held_against_the_sxm_profile(profile, device):
    assert not load_profile(profile).describes(device)
    # a `fastgraph profile` record of that card gets no share of this profile's peak
    assert not measured_on_profile(load_profile(profile), {"device": device, "profile": "other"})
