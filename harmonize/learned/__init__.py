"""Learned harmonizers (optional extra ``mrharmony[learn]``, PyTorch).

Nothing outside this package imports :mod:`torch`; importing this package does not
either. Code that needs it calls :func:`require_torch`, which names the extra when
PyTorch is missing. Model files are written by :mod:`.model_file` (``safetensors``
weights plus a JSON config, never pickle).
"""

from __future__ import annotations

from types import ModuleType

from mrharmony.errors import ConfigError, HarmonizeError

__all__ = ["EXTRA_HINT", "require_torch", "torch_device"]

#: The one line shown when the extra is missing.
EXTRA_HINT = "learned harmonizers need PyTorch: pip install 'mrharmony[learn]'"


def require_torch() -> ModuleType:
    """Import and return :mod:`torch`.

    Raises
    ------
    HarmonizeError
        If PyTorch (the ``learn`` extra) is not installed.
    """
    try:
        import torch
    except ImportError as exc:
        raise HarmonizeError(EXTRA_HINT) from exc
    return torch


def torch_device(device: str = "auto") -> str:
    """The torch device for a device request, in the toolkit's one device syntax.

    Parameters
    ----------
    device : str
        ``"auto"`` (the first CUDA GPU when torch sees one, else the CPU), ``"cpu"``,
        ``"cuda"`` or ``"cuda:N"`` -- the names :func:`mrharmony.backend.resolve_device`
        takes for the NumPy/CuPy code.

    Returns
    -------
    str
        ``"cpu"`` or ``"cuda:N"``.

    Raises
    ------
    ConfigError
        If the name is not a device or a GPU is requested where torch sees none.
    HarmonizeError
        If PyTorch is not installed.
    """
    from mrharmony.backend import parse_device

    parsed = parse_device(device)
    torch = require_torch()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if parsed == "auto":
        return "cuda:0" if count else "cpu"
    if parsed == "cpu":
        return "cpu"
    if int(parsed) >= count:
        raise ConfigError(f"device {device!r}: torch sees {count} CUDA device(s)")
    return f"cuda:{int(parsed)}"
