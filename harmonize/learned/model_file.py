"""Learned-model files: a folder with ``safetensors`` weights and a JSON config.

Format ``mrharmony-learned-model``, version 1. A model ``MODEL`` is a folder holding

* ``weights.safetensors``: every tensor of the model (network parameters and buffers,
  and fitted arrays such as a latent ComBat's estimates), by name;
* ``config.json``::

      {"format": "mrharmony-learned-model", "format_version": 1,
       "method": "deepharmony", "options": {...constructor options...},
       "state": {...fitted non-tensor state: site labels, shapes, scalings...},
       "training": {"fingerprint": "sha256:...", "epochs": 12, "seed": 0, ...},
       "versions": {"mrharmony": "...", "torch": "...", "numpy": "...", "safetensors": "..."},
       "created_utc": "..."}

Nothing is pickled and nothing is executed when a model is read. The folder is written
atomically (:func:`mrharmony.fileio.atomic_directory`): a reader sees the old model or
the new one, never half of one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mrharmony.errors import ModelFileError
from mrharmony.fileio import atomic_directory

from . import require_torch

__all__ = ["FORMAT", "FORMAT_VERSION", "fingerprint", "read_config", "read_learned",
           "write_learned"]

FORMAT = "mrharmony-learned-model"
FORMAT_VERSION = 1
_WEIGHTS = "weights.safetensors"
_CONFIG = "config.json"


def fingerprint(*arrays: Any) -> str:
    """A SHA-256 fingerprint of arrays (dtype, shape and bytes), e.g. of training data.

    Parameters
    ----------
    *arrays : array_like
        NumPy arrays, torch tensors or anything :func:`numpy.asarray` takes; strings
        and lists of strings (site labels) are hashed by their text.

    Returns
    -------
    str
        ``"sha256:<hex>"``.
    """
    h = hashlib.sha256()
    for a in arrays:
        if hasattr(a, "detach"):  # torch tensor
            a = a.detach().cpu().numpy()
        arr = np.asarray(a)
        if arr.dtype.kind in "OUS":
            arr = np.asarray([str(v) for v in arr.ravel()])
            h.update(("\x1f".join(arr.tolist())).encode())
        else:
            arr = np.ascontiguousarray(arr)
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(arr.tobytes())
    return "sha256:" + h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mrharmony", "torch", "numpy", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def write_learned(path: str | Path, *, method: str, tensors: Mapping[str, Any],
                  options: Mapping[str, Any] | None = None,
                  state: Mapping[str, Any] | None = None,
                  training: Mapping[str, Any] | None = None,
                  force: bool = False) -> Path:
    """Write a learned model folder.

    Parameters
    ----------
    path : path
        The model folder to create.
    method : str
        The harmonizer's registry name (``"deepharmony"``, ``"deepcombat"`` ...).
    tensors : mapping of str to tensor or array
        Weights and fitted arrays by name (torch tensors or NumPy arrays).
    options, state, training : mapping, optional
        JSON-serialisable constructor options, fitted non-tensor state, and the
        training record (fingerprint of the training data, epochs, seed, losses).
    force : bool
        Replace an existing model folder.

    Returns
    -------
    Path
        The model folder.

    Raises
    ------
    ModelFileError
        If the folder exists and ``force`` is false, or the config is not JSON-serialisable.
    """
    torch = require_torch()
    from safetensors.torch import save_file

    out = Path(path)
    if out.exists() and not force:
        raise ModelFileError(f"{out}: exists (use force/--force to replace it)")
    if out.exists() and not out.is_dir():
        raise ModelFileError(f"{out}: exists and is not a model folder")
    if not out.parent.is_dir():
        raise ModelFileError(f"{out.parent}: no such folder")
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": method,
              "options": dict(options or {}), "state": dict(state or {}),
              "training": dict(training or {}), "versions": _versions(),
              "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    try:
        text = json.dumps(config, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{out}: model config is not JSON-serialisable ({exc})") from exc
    weights = {}
    for name, value in tensors.items():
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        weights[name] = t.detach().cpu().contiguous()
    try:
        with atomic_directory(out) as tmp:
            save_file(weights, str(tmp / _WEIGHTS))
            (tmp / _CONFIG).write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise ModelFileError(f"{out}: cannot write the model ({exc.strerror or exc})") from exc
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    """The validated config of a learned model folder (no torch needed).

    Raises
    ------
    ModelFileError
        Not a folder, no/unreadable ``config.json``, another format or a newer version.
    """
    folder = Path(path)
    cfg_path = folder / _CONFIG
    if not folder.is_dir() or not cfg_path.is_file():
        raise ModelFileError(f"{folder}: not a learned model (no {_CONFIG} in a folder)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{cfg_path}: unreadable model config ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFileError(f"{cfg_path}: not a {FORMAT} config")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ModelFileError(f"{cfg_path}: format version {version!r} is not supported "
                             f"(this reader knows 1..{FORMAT_VERSION})")
    for key, kind in (("method", str), ("options", dict), ("state", dict),
                      ("training", dict)):
        if not isinstance(config.get(key), kind):
            raise ModelFileError(f"{cfg_path}: '{key}' missing or not a {kind.__name__}")
    return config


def read_learned(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a learned model folder.

    Returns
    -------
    config : dict
        As :func:`read_config`.
    tensors : dict of str to torch.Tensor
        The weights and fitted arrays, on the CPU.

    Raises
    ------
    ModelFileError
        As :func:`read_config`, or unreadable/corrupt weights.
    HarmonizeError
        If PyTorch is not installed.
    """
    config = read_config(path)
    require_torch()
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(path) / _WEIGHTS
    if not weights.is_file():
        raise ModelFileError(f"{path}: no {_WEIGHTS}")
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{weights}: unreadable weights ({exc})") from exc
    return config, tensors
