"""Test-time augmentation inside the graph: the model averages its outputs over mirrored views."""

from __future__ import annotations

import torch.fx as fx

from fastgraph.core.modules import TTAMean, TTAViews

from . import copy_module, finish, register
from ._fx import unique_name
from ._options import require


@register(exact=False, modes=("infer",))
def tta_flip(gm: fx.GraphModule, *, level: int = 1) -> fx.GraphModule:
    """Inference: the graph runs x and its mirror (level 2: and translates) in one batch and averages outputs.

    Sources: Page, "How to Train Your ResNet 8: Bag of Tricks", 2019 (mirror TTA);
    Jordan, airbench94, 2024 (``tta_level``: 1 = mirror, 2 = mirror + translate).

    The single input x (N, C, H, W) feeds a :class:`~fastgraph.core.modules.TTAViews` that
    concatenates the views along the batch axis, the unchanged model runs once on the
    (V*N, C, H, W) batch, and a :class:`~fastgraph.core.modules.TTAMean` before the output
    averages the V outputs per image, returning (N, ...) as before. Level 1 (V = 2):
    mean of model(x) and model(flip(x)). Level 2 (V = 6, airbench94's scheme):
    1/4 * (model(x) + model(flip(x))) + 1/8 * sum over t in {up-left, down-right 1-pixel
    translates from a reflect padding} of (model(t) + model(flip(t))). The mirror is
    ``torch.flip``, which ONNX exports as a Slice with step -1 (ONNX has no Flip op), so
    exported engines carry the TTA. Parameter names are unchanged. The function changes
    by design (a different, usually better, classifier), hence not exact; it costs V
    times the inference FLOPs and is meant for evaluation-mode graphs only (in training
    mode the views would share batch-norm statistics).

    Options:
        level: 1 (mirror) or 2 (mirror + translate).

    Guards: the graph must have exactly one input and return a single tensor; a graph
    that already holds TTA views of this level is returned unchanged. Raises
    ``PassOptionError`` for a level other than 1 or 2, or than the one the graph holds.
    """
    require(level in (1, 2), "tta_flip", f"level must be 1 or 2, got {level!r}")
    held = {m.level for m in gm.modules() if isinstance(m, (TTAViews, TTAMean))}
    require(held <= {level}, "tta_flip", f"the graph already holds TTA of level {min(held, default=0)}, "
            f"not {level}: views of both would be averaged")
    if held:
        return gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if len(placeholders) != 1 or not isinstance(output.args[0], fx.Node):
        return gm

    out = copy_module(gm)
    x = next(n for n in out.graph.nodes if n.op == "placeholder")
    output = next(n for n in out.graph.nodes if n.op == "output")
    views_name, mean_name = unique_name(out, "tta_views"), unique_name(out, "tta_mean")
    out.add_submodule(views_name, TTAViews(level).train(gm.training))
    out.add_submodule(mean_name, TTAMean(level).train(gm.training))
    with out.graph.inserting_after(x):
        views = out.graph.call_module(views_name, args=(x,))
    rewritten = [u.name for u in x.users]  # they now read the views
    x.replace_all_uses_with(views, delete_user_cb=lambda user: user is not views)
    with out.graph.inserting_before(output):
        merged = out.graph.call_module(mean_name, args=(output.args[0],))
    output.args = (merged,)
    return finish(out, rewrites=1, rewritten=[*rewritten, output.name])
