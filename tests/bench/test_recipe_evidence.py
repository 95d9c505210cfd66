"""bench/recipe_evidence.py: its variants are the recipes with exactly the stated
changes, its narrow models build, and its statistics are Welch's test."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from fastgraph.core.loading import load_model
from fastgraph.training.recipes import load_recipe
from support import load_script


@pytest.fixture(scope="module")
def evidence():
    yield load_script("bench/recipe_evidence.py", "recipe_evidence")
    sys.modules.pop("recipe_evidence", None)


def _passes(recipe):
    return {p.name: p.options for p in recipe.passes}


def test_each_variant_is_its_recipe_with_only_the_stated_changes(evidence):
    variants = {v.key: v for v in evidence.VARIANTS}
    for source, other in evidence.COMPARISONS:
        assert source in variants and other in variants
    page, reproduce = (evidence.recipe_for(variants[k]) for k in ("page2019", "page2019_reproduce"))
    shipped = load_recipe("page2019")
    assert page.to_dict()["passes"] == shipped.to_dict()["passes"]
    assert {**page.sections, "eval": shipped["eval"]} == shipped.sections  # only the scale's eval model
    assert page["eval"]["model"] == "trained"
    assert _passes(reproduce)["whitening"] == {**_passes(page)["whitening"], "pointwise_init": "reproduce"}
    fast, pointwise = (evidence.recipe_for(variants[k]) for k in ("fast", "fast_pointwise"))
    changed = {**_passes(fast)["whitening"], "into": "pointwise", "pointwise_init": "reproduce"}
    del changed["bias_epochs"]
    assert _passes(pointwise)["whitening"] == changed
    muon = evidence.recipe_for(variants["fast_muon_triangle"])
    assert muon["muon"]["enabled"] and not fast["muon"]["enabled"]
    assert {**muon.sections, "muon": fast["muon"]} == fast.sections


def test_the_narrow_models_build(evidence, tmp_path):
    for name, text in evidence.MODELS.items():
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        model = load_model(path).eval()
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    head = load_model(tmp_path / "airbench94_muon.py").head.weight
    assert head.std().item() == pytest.approx(1.0, rel=1e-5)


def test_welch_matches_the_formula(evidence):
    a, b = [0.50, 0.52, 0.51, 0.53, 0.49], [0.47, 0.48, 0.50, 0.46, 0.49]
    out = evidence.welch(a, b)
    va, vb = (sum((x - sum(v) / 5) ** 2 for x in v) / 4 / 5 for v in (a, b))
    assert out["difference"] == pytest.approx(sum(a) / 5 - sum(b) / 5)
    assert out["t"] == pytest.approx(out["difference"] / math.sqrt(va + vb))
    assert 0 < out["p"] < 0.05
    assert evidence.welch([0.5], [0.4])["p"] is None
