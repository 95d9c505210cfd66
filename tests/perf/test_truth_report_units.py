"""The optimize roofline table's "roof step" is a step of the measured batch, whatever batch
the run's roofline amortised parameter reads over; the profile table's summed column is
forward + backward, not torch.profiler's exclusive "self" time."""

from __future__ import annotations

import io

from rich.console import Console

from fastgraph.compiler.report import roofline_table
from fastgraph.perf.profile import profile_view


def _text(renderable, width: int = 200) -> str:
    buf = io.StringIO()
    Console(width=width, file=buf).print(renderable, crop=False)
    return buf.getvalue()


def _row(graph: str) -> dict:
    # A training run of 500,000 images whose roofline used batches of 512 (optimize's default
    # on a CPU, where the measured step has 32 images).
    return {"graph": graph, "mode": "train", "images": 500_000, "batch_size": 512,
            "step_flops_per_image": 242.4e6, "step_bytes_per_image": 8.47e6, "arithmetic_intensity": 28.6,
            "roofline_seconds": 1.264, "bound": "memory", "measured_step_seconds": 0.620,
            "measured_images_per_second": 51.6, "measured_flops_per_second": 12.5e9}


def test_roof_step_is_the_measured_batch_of_images():
    result = {"mode": "train", "epochs": 10, "profile": "h100", "precision": "bf16", "device": "cpu",
              "batch_size": 32, "roofline": [_row("before"), _row("after")]}
    text = " ".join(_text(roofline_table(result)).split())
    assert "one training step of 32 images" in text
    per_image = 1.264 / 500_000  # the run's roofline seconds per image
    assert f"{per_image * 32 * 1e6:.3g} µs" in text  # 80.9 µs for 32 images
    assert f"{per_image * 512 * 1e3:.3g} ms" not in text  # not 1.29 ms, a step of 512
    assert "parameter reads amortised over 512 images" in text


def test_profile_sum_column_is_forward_plus_backward():
    row = {"node": "conv", "forward_seconds": 1e-3, "backward_seconds": 2e-3, "seconds": 3e-3,
           "percent_of_step": 30.0, "flops": 6e6, "bytes": 1e5, "achieved_flops_per_second": 2e9,
           "fraction_of_peak": None, "arithmetic_intensity": 60.0, "profiler_forward_flops": 2e6}
    result = {"steps": 2, "batch_size": 16, "device": "cpu",
              "timing_method": "torch.profiler, CPU op times per node, wall time", "rows": [row],
              "phases": {"step": 1e-2}, "step_seconds": 1e-2, "nodes_seconds": 3e-3,
              "backward_unattributed_seconds": 0.0, "step_flops": 6e6, "flops_method": "model",
              "profile": "h100", "precision": "fp32", "peak_flops_per_second": 66.9e12,
              "trace": "trace.json", "nsys_command": None}
    text = _text(profile_view(result))
    header = next(line for line in text.splitlines() if "fwd ms" in line).split()
    cells = next(line for line in text.splitlines() if line.split()[:1] == ["conv"]).split()
    # The third time column is the sum of the first two, and is not called "self" time.
    fwd, bwd, total = (float(c) for c in cells[1:4])
    assert total == fwd + bwd == 3.0
    assert "self" not in header and "self time" not in " ".join(text.split())
