"""What the optimize tables say their numbers are: the roofline column is one step, the
same step as the measured one beside it, and each "bytes per image" names its precision."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fastgraph import passes as registry
from fastgraph.compiler.report import pass_table, roofline_table


def _row(graph: str, roofline_seconds: float, images: int) -> dict:
    return {"graph": graph, "mode": "infer", "images": images, "batch_size": 8,
            "step_flops_per_image": 81.1e6, "step_bytes_per_image": 2.89e6, "arithmetic_intensity": 28.1,
            "roofline_seconds": roofline_seconds, "bound": "memory", "measured_step_seconds": 6.16e-3,
            "measured_images_per_second": 1298.0, "measured_flops_per_second": 105e9}


def _text(table) -> str:
    buf = io.StringIO()
    Console(width=100, file=buf).print(table)
    return buf.getvalue()


@pytest.mark.parametrize(("mode", "images", "step"), [("infer", 10_000, "inference batch"),
                                                       ("train", 500_000, "training step")])
def test_the_roofline_column_is_one_step_like_the_measured_one(mode, images, step):
    result = {"mode": mode, "epochs": 10, "profile": "h100", "precision": "bf16", "device": "cpu",
              "batch_size": 8, "roofline": [_row("before", 8.62e-3, images), _row("after", 6.37e-3, images)]}
    text = _text(roofline_table(result))
    assert "the step's time on the roofline" not in text
    assert "roof step" in " ".join(text.split()) and f"one {step} of 8 images" in " ".join(text.split())
    per_step = 8.62e-3 * 8 / images  # the whole run's roofline time, per batch of 8
    assert f"{per_step * 1e6:.3g}" in text and f"{images:,}" in text  # the step, and the run it is a part of
    assert "bytes at bf16" in " ".join(text.split())


def test_each_bytes_per_image_names_its_precision():
    passes = [{"name": "fold_bn", "exactness": "exact", "status": "applied", "rewrites": 19,
               "max_output_diff": 1e-7, "max_grad_diff": None, "tolerance": 1e-5, "flops_before": 81.1e6,
               "flops_after": 81.1e6, "bytes_before": 5.78e6, "bytes_after": 4.27e6}]
    assert "bytes at the model's own dtypes" in " ".join(_text(pass_table(passes, "infer")).split())


def test_tta_is_an_inference_time_pass_not_a_training_time_one():
    import torch
    import torch.fx as fx

    from fastgraph.core.pass_manager import run_passes

    assert registry.get("tta_flip").exactness == "inference-time"
    assert registry.get("ghost_batchnorm").exactness == "training-time"
    assert registry.get("fold_bn").exactness == "exact"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    model(torch.zeros(2, 3, 32, 32))
    _, report = run_passes(fx.symbolic_trace(model.eval()), ["tta_flip"], mode="infer")
    (outcome,) = report.outcomes
    assert outcome.status == "applied" and outcome.exactness == "inference-time"
    assert "train with it" not in outcome.message and "no training needed" in outcome.message
