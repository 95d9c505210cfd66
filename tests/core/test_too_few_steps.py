"""One timed step on a side has no spread: no verdict of faster or slower from it."""

from __future__ import annotations

import pytest

from fastgraph.core.timing import compare_step_times


@pytest.mark.parametrize(("before", "after"), [([0.1], [0.3]), ([0.104], [0.1]), ([0.2, 0.21], [0.1])])
def test_one_step_a_side_tells_nothing(before, after):
    result = compare_step_times(before, after)
    assert result["verdict"] == "n too small to tell"
    assert result["text"].startswith(f"{result['speedup']:.3f}x, n too small to tell")
    assert "faster" not in result["text"] and "slower" not in result["text"]


def test_two_steps_a_side_still_compare():
    assert compare_step_times([0.2, 0.21], [0.1, 0.11])["verdict"] == "faster"
