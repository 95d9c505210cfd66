"""swap_activation: ReLU in every form becomes CELU / GELU / SiLU modules."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastgraph.passes import get, rewrite_count
from fastgraph.passes._options import PassOptionError

RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)


@pytest.fixture
def example(example_graph):
    """``example("resnet20")``: that example file's model traced with torch.fx (train mode)."""
    return lambda name: example_graph(f"{name}.py")


def relu_nodes(gm) -> int:
    return sum(
        (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU))
        or (n.op == "call_function" and n.target in RELU_FUNCTIONS)
        or (n.op == "call_method" and n.target in ("relu", "relu_"))
        for n in gm.graph.nodes
    )


def count(gm, kind) -> int:
    return sum(n.op == "call_module" and type(gm.get_submodule(n.target)) is kind for n in gm.graph.nodes)


class FourForms(nn.Module):
    """The same small net with its activation written four ways (module in place, F.relu,
    torch.relu_, Tensor.relu), or, for the hand-built reference, ``act`` everywhere."""

    def __init__(self, act: nn.Module | None = None):
        super().__init__()
        self.act = act
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = act if act is not None else nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a = self.act if self.act is not None else None
        x = self.relu(self.conv1(x))
        x = a(self.conv2(x)) if a is not None else F.relu(self.conv2(x))
        x = a(self.conv3(x)) if a is not None else torch.relu_(self.conv3(x))
        x = x.mean((2, 3))
        return self.fc(a(x) if a is not None else x.relu())


@pytest.mark.parametrize(("to", "module"),
                         [("celu", nn.CELU(0.075)), ("gelu", nn.GELU()), ("silu", nn.SiLU())])
def test_outputs_equal_hand_built_reference(real_batch, to, module):
    x, _ = real_batch
    gm = fx.symbolic_trace(FourForms().eval())
    code = gm.code
    out = get("swap_activation").fn(gm, to=to)
    assert gm.code == code and relu_nodes(gm) == 4  # input untouched
    assert relu_nodes(out) == 0 and rewrite_count(gm, out) == 4
    assert count(out, type(module)) == 4
    assert not any(getattr(m, "inplace", False) for m in out.modules())

    reference = FourForms(module).eval()
    reference.load_state_dict(gm.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(out(x), reference(x), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(out(x), gm(x), atol=1e-4)  # the function did change


@pytest.mark.parametrize(("name", "relus"), [("resnet9", 8), ("resnet20", 19), ("preact_resnet20", 19)])
def test_counts_on_examples(example, real_batch, name, relus):
    gm = example(name)
    assert relu_nodes(gm) == relus
    out = get("swap_activation").fn(gm, to="celu", alpha=0.3)
    assert relu_nodes(out) == 0 and rewrite_count(gm, out) == relus
    celus = [out.get_submodule(n.target) for n in out.graph.nodes
             if n.op == "call_module" and isinstance(out.get_submodule(n.target), nn.CELU)]
    assert len(celus) == relus and all(m.alpha == 0.3 for m in celus)
    if name == "resnet20":  # small enough to run here; must still compute
        x = real_batch[0][:8]
        with torch.no_grad():
            assert torch.isfinite(out(x)).all()


def test_inplace_relu_whose_input_has_other_users_is_kept():
    class Aliased(nn.Module):
        def forward(self, x):
            y = x * 2
            z = F.relu(y, inplace=True)  # also overwrites y, which the add reads
            return z + y

    gm = fx.symbolic_trace(Aliased())
    assert get("swap_activation").fn(gm) is gm


def test_negative_cases():
    gelu_net = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU()))
    assert get("swap_activation").fn(gelu_net) is gelu_net  # no ReLU
    assert get("swap_activation").fn(gelu_net, to="gelu", from_=("gelu",)) is gelu_net  # already GELU
    celu_net = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.CELU(0.075)))
    assert get("swap_activation").fn(celu_net, from_="celu", alpha=0.075) is celu_net
    swapped = get("swap_activation").fn(celu_net, from_="celu", alpha=0.3)
    assert swapped.get_submodule("1").alpha == 0.3
    with pytest.raises(PassOptionError, match="to must be"):
        get("swap_activation").fn(gelu_net, to="tanh")
    with pytest.raises(PassOptionError, match="from_"):
        get("swap_activation").fn(gelu_net, from_=("sigmoid",))
