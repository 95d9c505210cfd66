"""Where fastgraph's Triton kernels can run, decided once per process (private helpers).

Triton decides at decoration time whether ``@triton.jit`` builds a compiled kernel or an
interpreted one (``TRITON_INTERPRET=1``), so the kernel modules read :data:`INTERPRET`
once, at import, next to their kernels. Compiled kernels run on CUDA tensors; interpreted
ones run on CPU tensors (the CPU test path: fp32 only, the interpreter has no bf16).
Where neither holds, the public functions fall back to their PyTorch references.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # triton is absent on macOS/Windows and on minimal installs: the references still work
    import triton
    import triton.language as tl

    HAS_TRITON = True
    try:
        INTERPRET = bool(triton.knobs.runtime.interpret)
    except AttributeError:  # triton < 3.4 reads the variable directly
        INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    triton = None
    tl = None
    HAS_TRITON = False
    INTERPRET = False


def can_launch(t: torch.Tensor) -> bool:
    """Whether this process's kernels can take ``t``: CUDA when compiled, CPU when interpreted.

    Never both: under ``TRITON_INTERPRET=1`` a CUDA tensor (real or fake) is not launchable,
    so the public functions hand it to their PyTorch references, never to the interpreter.
    Fake and functional tensors (torch.compile tracing) count as launchable only on CUDA,
    where the compiled kernels enter the graph through ``torch.library.wrap_triton``; on the
    CPU the traced graph holds the reference instead.
    """
    if not HAS_TRITON:
        return False
    if t.device.type == "cuda":
        return not INTERPRET
    return t.device.type == "cpu" and INTERPRET and not torch.compiler.is_compiling()


def require_launchable(t: torch.Tensor, what: str) -> None:
    """Raise ``RuntimeError`` (one line, saying what to do) when ``t`` cannot reach the kernels."""
    if not HAS_TRITON:
        raise RuntimeError(f"{what}: triton is not installed; use the PyTorch reference")
    if not can_launch(t):
        raise RuntimeError(
            f"{what}: Triton kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 "
            f"is set before triton is imported (got a {t.device.type} tensor, interpreter "
            f"{'on' if INTERPRET else 'off'})"
        )


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a reduction grid should aim for: a few per SM on a GPU.

    The interpreter runs programs one after another in Python, so on the CPU a handful of
    large programs is fastest.
    """
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (>= 1); Triton block sizes must be powers of two."""
    return 1 << max(0, (int(n) - 1).bit_length())
