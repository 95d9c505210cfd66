"""Which device a command runs on, and its name in reports."""

from __future__ import annotations

from fastgraph.core.errors import UserError


def resolve_device(name: str | None):
    """The ``torch.device`` for ``--device NAME``: ``None`` or ``"auto"`` mean CUDA when
    available, else the CPU.

    Raises:
        UserError: an unknown device string, CUDA asked for without a GPU, or a device
            type other than cpu and cuda.
    """
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available in this PyTorch build/machine")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def device_name(device) -> str:
    """The GPU's name for a CUDA ``torch.device``, else ``"cpu"``."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
