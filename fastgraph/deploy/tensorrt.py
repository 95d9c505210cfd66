"""TensorRT engines of an inference graph through Torch-TensorRT (extra ``gpu``).

The graph is exported with ``torch.export`` (dynamic batch axis unless a fixed batch is
asked for), compiled by ``torch_tensorrt.dynamo.compile`` for the batch range
[1, ``max_batch``] (optimised for ``opt_batch``), saved as an ExportedProgram with
``torch_tensorrt.save`` and reloaded with ``torch.export.load`` so that what is verified
is the file on disk. Follows the Torch-TensorRT user guide ("Dynamic shapes",
"Saving models compiled with Torch-TensorRT").
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastgraph.core.errors import UserError

INSTALL_HINT = "pip install 'fastgraph[gpu]'"


def require_tensorrt():
    """The ``torch_tensorrt`` module, and CUDA.

    Raises:
        UserError: torch_tensorrt is not installed (the message names the extra to
            install), or no CUDA device is available.
    """
    try:
        import torch_tensorrt
    except ImportError:
        raise UserError("--format tensorrt needs torch_tensorrt, which is not installed: "
                        f"{INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise UserError("--format tensorrt needs a CUDA GPU; none is available on this machine")
    return torch_tensorrt


def _compile_settings(torch_tensorrt, precision: str) -> dict:
    """Keyword arguments for the precision: newer Torch-TensorRT respects the module's own
    dtypes (``use_explicit_typing``, the fp16 module is already half); older ones need
    ``enabled_precisions`` to build fp16 kernels."""
    fields = getattr(getattr(torch_tensorrt.dynamo, "CompilationSettings", None), "__dataclass_fields__", {})
    if precision == "fp16" and "use_explicit_typing" not in fields:
        return {"enabled_precisions": {torch.float16, torch.float32}}
    return {}


def compile_tensorrt(module: nn.Module, path: str | Path, *, batch: int | None, precision: str,
                     device: torch.device, opt_batch: int = 256, max_batch: int = 10_000,
                     image_shape: tuple[int, int, int] = (3, 32, 32)) -> tuple[nn.Module, dict]:
    """Compile ``module`` (eval, float32 input (N, 3, 32, 32)) to TensorRT, save it to ``path``, reload it.

    Args:
        module: the inference module (its parameters in the precision to build: an fp16
            module casts its input inside).
        path: the ``.ep`` file to write (an ExportedProgram holding the engine).
        batch: a fixed batch, or ``None`` for a dynamic batch in [1, ``max_batch``].
        precision: ``fp32`` or ``fp16``.
        device: the CUDA device to build on.

    Returns:
        (the reloaded module, ``{"compiler", "torch_tensorrt", "dynamic_batch", "batch_range", "bytes"}``).

    Raises:
        UserError: see :func:`require_tensorrt`.
    """
    torch_tensorrt = require_tensorrt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.to(device).eval()
    if batch:
        example = torch.randn(batch, *image_shape, device=device)
        inputs = [torch_tensorrt.Input(shape=(batch, *image_shape), dtype=torch.float32)]
        dynamic_shapes = None
        batch_range = (batch, batch)
    else:
        example = torch.randn(min(opt_batch, max_batch), *image_shape, device=device)
        dim = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic_shapes = ({0: dim},)
        inputs = [torch_tensorrt.Input(min_shape=(1, *image_shape), opt_shape=tuple(example.shape),
                                       max_shape=(max_batch, *image_shape), dtype=torch.float32)]
        batch_range = (1, max_batch)
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes, strict=False)
        settings = _compile_settings(torch_tensorrt, precision)
        engine = torch_tensorrt.dynamo.compile(program, inputs=inputs, **settings)
    try:
        torch_tensorrt.save(engine, str(path), output_format="exported_program", arg_inputs=[example],
                            dynamic_shapes=dynamic_shapes)
    except TypeError:  # Torch-TensorRT before arg_inputs/dynamic_shapes: the inputs keyword
        torch_tensorrt.save(engine, str(path), output_format="exported_program", inputs=[example])
    reloaded = torch.export.load(str(path)).module()
    return reloaded, {"compiler": "torch_tensorrt.dynamo.compile",
                      "torch_tensorrt": torch_tensorrt.__version__, "dynamic_batch": batch is None,
                      "batch_range": list(batch_range), "bytes": path.stat().st_size}
