"""The one array-module helper: code written against ``xp`` runs on NumPy or CuPy.

CuPy is optional (``pip install mrharmony[gpu]``) and is imported lazily, on the first
call that needs it, never when :mod:`mrharmony` is imported. Typical use::

    from mrharmony.backend import get_array_module, to_device, to_numpy

    xp = get_array_module(x)      # numpy or cupy, whichever owns x
    y = xp.fft.fftn(x)
    image = to_numpy(y)           # host copy for writing files

Devices are named ``"cpu"`` or ``"cuda"``/``"cuda:N"``; ``"auto"`` picks the first GPU
when CuPy and a CUDA device are present, else the CPU.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import numpy as np

from mrharmony.errors import ConfigError

__all__ = [
    "cupy_available",
    "get_array_module",
    "get_xp",
    "parse_device",
    "resolve_device",
    "to_device",
    "to_numpy",
]


@functools.cache
def _cupy() -> ModuleType | None:
    """Import CuPy once and return it if it works with at least one CUDA device."""
    try:
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # ImportError, CUDA driver errors, missing libraries
        return None
    return cupy


def cupy_available() -> bool:
    """Return True when CuPy imports and sees at least one CUDA device."""
    return _cupy() is not None


def parse_device(device: str) -> str | int:
    """Parse a device name in the toolkit's one device syntax (no availability check).

    Parameters
    ----------
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (case and spaces ignored).

    Returns
    -------
    str or int
        ``"auto"``, ``"cpu"``, or the CUDA device index ``N`` (``0`` for ``"cuda"``).

    Raises
    ------
    ConfigError
        If the name is not a device.
    """
    name = device.strip().lower()
    if name in ("auto", "cpu"):
        return name
    if name == "cuda" or name.startswith("cuda:"):
        index_text = name.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise ConfigError(f"device {device!r}: expected 'cuda:N' with an integer N")
        return int(index_text)
    raise ConfigError(f"device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def resolve_device(device: str = "auto") -> str:
    """Turn a device request into a concrete device name (for NumPy/CuPy code).

    Parameters
    ----------
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns
    -------
    str
        ``"cpu"`` or ``"cuda:N"``.

    Raises
    ------
    ConfigError
        If the name is not a device, or a GPU is requested where none is usable.
    """
    parsed = parse_device(device)
    if parsed == "auto":
        return "cuda:0" if cupy_available() else "cpu"
    if parsed == "cpu":
        return "cpu"
    cupy = _cupy()
    if cupy is None:
        raise ConfigError(
            f"device {device!r}: CuPy with a CUDA device is not available "
            "(install mrharmony[gpu] on a machine with an NVIDIA GPU, or use 'cpu')"
        )
    count = cupy.cuda.runtime.getDeviceCount()
    if int(parsed) >= count:
        raise ConfigError(f"device {device!r}: only {count} CUDA device(s) present")
    return f"cuda:{int(parsed)}"


def get_xp(device: str = "cpu") -> ModuleType:
    """Return the array module (``numpy`` or ``cupy``) for a device name."""
    resolved = resolve_device(device)
    return np if resolved == "cpu" else _cupy()  # type: ignore[return-value]


def get_array_module(*arrays: Any) -> ModuleType:
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``.

    Does not import CuPy unless it is already imported by the caller's data.
    """
    import sys

    cupy = sys.modules.get("cupy")
    if cupy is not None:
        for a in arrays:
            if isinstance(a, cupy.ndarray):
                return cupy
    return np


def to_device(x: Any, device: str = "cpu") -> Any:
    """Copy an array to a device (``"cpu"`` gives NumPy, ``"cuda:N"`` gives CuPy)."""
    resolved = resolve_device(device)
    if resolved == "cpu":
        return to_numpy(x)
    cupy = _cupy()
    with cupy.cuda.Device(int(resolved.partition(":")[2])):
        return cupy.asarray(x)


def to_numpy(x: Any) -> np.ndarray:
    """Return a NumPy array on the host, copying from the GPU when needed."""
    xp = get_array_module(x)
    if xp is np:
        return np.asarray(x)
    return xp.asnumpy(x)
