"""tta_flip: one batch-concatenated graph averages the model over mirrored (and translated) views."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastgraph.core.modules import TTAMean, TTAViews
from fastgraph.passes import get, rewrite_count
from fastgraph.passes._options import PassOptionError


@pytest.fixture
def example(example_graph):
    """``example("resnet20")``: that example file's model traced with torch.fx (train mode)."""
    return lambda name: example_graph(f"{name}.py")


@pytest.fixture
def resnet20(example):
    return example("resnet20").eval()


class MirrorSymmetric(nn.Module):
    """Flip-invariant by construction: left-right symmetric kernels, symmetric padding,
    global average pooling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_(conv.weight + conv.weight.flip(-1))

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_level1_is_mean_of_plain_and_mirrored(resnet20, real_batch):
    x = real_batch[0][:16]
    code = resnet20.code
    out = get("tta_flip").fn(resnet20)
    assert resnet20.code == code and rewrite_count(resnet20, out) == 1
    assert out.state_dict().keys() == resnet20.state_dict().keys()  # parameter names unchanged

    seen = []
    hook = out.get_submodule("conv1").register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        y = out(x)
        reference = (resnet20(x) + resnet20(x.flip(-1))) / 2
    hook.remove()
    assert seen == [32]  # one model call on the concatenated batch of 2 x 16
    assert y.shape == (16, 10)
    torch.testing.assert_close(y, reference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(y, resnet20(x), atol=1e-4)  # ResNet-20 is not mirror-symmetric


def test_level2_matches_airbench_weights(resnet20, real_batch):
    x = real_batch[0][:8]
    out = get("tta_flip").fn(resnet20, level=2)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[:, :, 0:32, 0:32], padded[:, :, 2:34, 2:34]

    def mirror_mean(images):
        return 0.5 * resnet20(images) + 0.5 * resnet20(images.flip(-1))

    with torch.no_grad():
        reference = 0.5 * mirror_mean(x) + 0.5 * (mirror_mean(up_left) + mirror_mean(down_right)) / 2
        torch.testing.assert_close(out(x), reference, atol=1e-5, rtol=1e-5)


def test_mirror_symmetric_model_is_unchanged(real_batch):
    x = real_batch[0]
    gm = fx.symbolic_trace(MirrorSymmetric().eval())
    out = get("tta_flip").fn(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x.flip(-1)), gm(x), atol=1e-5, rtol=1e-5)  # the premise
        torch.testing.assert_close(out(x), gm(x), atol=1e-5, rtol=1e-5)


def test_graph_structure_and_onnx_export(resnet20, real_batch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime

    out = get("tta_flip").fn(resnet20, level=2)
    targets = [n.target for n in out.graph.nodes if n.op == "call_module"]
    assert targets[0] == "tta_views" and targets[-1] == "tta_mean"
    assert isinstance(out.get_submodule("tta_views"), TTAViews)
    assert isinstance(out.get_submodule("tta_mean"), TTAMean)

    x = real_batch[0][:4]
    program = torch.onnx.export(out, (x,), dynamo=True, verbose=False)
    ops = {n.op_type for n in program.model_proto.graph.node}
    assert "Slice" in ops and "Flip" not in ops  # ONNX has no Flip: a step -1 Slice
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), out(x), atol=1e-5, rtol=1e-5)


def test_negative_cases(resnet20):
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    class TupleOutput(nn.Module):
        def forward(self, x):
            return x, x.mean()

    for model in (TwoInputs(), TupleOutput()):
        gm = fx.symbolic_trace(model)
        assert get("tta_flip").fn(gm) is gm
    once = get("tta_flip").fn(resnet20)
    assert get("tta_flip").fn(once) is once  # already augmented
    with pytest.raises(PassOptionError, match="level"):
        get("tta_flip").fn(resnet20, level=3)


def test_a_graph_with_tta_takes_the_same_level_again_and_refuses_another(real_batch):
    x = real_batch[0][:8]
    gm = fx.symbolic_trace(MirrorSymmetric().eval())
    flip = get("tta_flip").fn(gm, level=1)
    assert get("tta_flip").fn(flip, level=1) is flip  # views of views would average twice
    with pytest.raises(PassOptionError, match="already holds TTA of level 1, not 2"):
        get("tta_flip").fn(flip, level=2)
    torch.testing.assert_close(flip(x), gm(x))  # flip-invariant: the TTA changes nothing here


def test_export_refuses_another_tta_than_the_graph_holds_before_writing(data_path, tmp_path):
    pytest.importorskip("onnx", reason="extra 'export' (onnx) not installed")
    from fastgraph import export
    from fastgraph.core.errors import UserError

    flip = get("tta_flip").fn(fx.symbolic_trace(MirrorSymmetric().eval()), level=1)
    out = tmp_path / "net.onnx"
    for asked in ("none", "flip-translate"):  # the report would have named the asked one
        with pytest.raises(UserError, match="already holds flip TTA in its graph .*--tta flip"):
            export(flip, out, tta=asked, data=data_path, verify_images=100)
    assert not out.exists()
