"""Save and load fitted harmonization models: a versioned file with no executable content.

File format ``mrharmony-harmonize-model``, version 1 (suffix ``.model`` by convention):
an uncompressed NumPy ``.npz`` archive (a ZIP of ``.npy`` files) holding

* ``__metadata__``: a ``uint8`` array with UTF-8 JSON::

      {"format": "mrharmony-harmonize-model", "format_version": 1,
       "model": "ComBat" | "CovBat" | "ComBatGAM" | "LongitudinalComBat" | "TravelingComBat",
       "mrharmony_version": "...", "created_utc": "...",
       "state": {...model options (CovBat/LongitudinalComBat: "mode"; files without it
                 predate the modes and load as "pooled"/"moments"), batch levels,
                 covariate encoding, feature names...},
       "arrays": {"name": {"shape": [...], "dtype": "<f8"}, ...}, "extra": {...}}

* one numeric array per fitted parameter (float64 / bool / int64; names are listed in
  ``arrays``; nested models use ``"<prefix>/<name>"``).

Loading uses ``np.load(allow_pickle=False)``: no object arrays, no pickle, nothing is
executed. A file with another ``format`` or a ``format_version`` newer than this
reader, a missing array or a shape/dtype that differs from the metadata raises
:class:`~mrharmony.errors.ModelFileError`. Files are written atomically (temporary file
in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import datetime as _dt
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from mrharmony.errors import ModelFileError
from mrharmony.fileio import atomic_path

__all__ = ["FORMAT", "FORMAT_VERSION", "load_model", "read_metadata", "save_model"]

FORMAT = "mrharmony-harmonize-model"
FORMAT_VERSION = 1
_META_KEY = "__metadata__"


def _model_classes() -> dict[str, type]:
    from mrharmony.harmonize.combat import ComBat
    from mrharmony.harmonize.combat_variants import (
        ComBatGAM,
        CovBat,
        LongitudinalComBat,
        TravelingComBat,
    )

    return {c.model_kind: c for c in (ComBat, CovBat, ComBatGAM, LongitudinalComBat,
                                      TravelingComBat)}


def save_model(model: Any, path: str | Path, *, force: bool = False,
               extra: dict[str, Any] | None = None) -> Path:
    """Write a fitted model to ``path``.

    Parameters
    ----------
    model : ComBat or a variant
        A fitted model (anything with ``model_kind`` and ``_get_state()``).
    path : str or Path
        Output file (written as given; ``.model`` is the convention).
    force : bool
        Overwrite an existing file.
    extra : dict, optional
        JSON-serialisable context stored alongside (e.g. the CLI's column names).

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``force`` is False.
    ModelFileError
        The state is not serialisable (object arrays or non-JSON metadata).
    """
    from mrharmony import __version__

    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists (use --force / force=True to replace it)")
    state, arrays = model._get_state()
    clean: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        a = np.asarray(arr)
        if a.dtype.kind not in "biuf":
            raise ModelFileError(f"{name}: dtype {a.dtype} cannot be stored (numeric only)")
        clean[name] = np.ascontiguousarray(a)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.model_kind,
            "mrharmony_version": __version__,
            "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "state": state, "extra": extra or {},
            "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str}
                       for k, v in clean.items()}}
    try:
        blob = json.dumps(meta, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: model metadata is not JSON-serialisable: {exc}") from exc
    clean[_META_KEY] = np.frombuffer(blob, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".tmp") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **clean)
    return path


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: empty file, not a {FORMAT} model")
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as npz:
            if _META_KEY not in npz.files:
                raise ModelFileError(f"{path}: not a {FORMAT} file (no {_META_KEY})")
            meta = json.loads(npz[_META_KEY].tobytes().decode("utf-8"))
            arrays = {k: npz[k] for k in npz.files if k != _META_KEY}
    except (zipfile.BadZipFile, OSError, ValueError, UnicodeDecodeError, EOFError) as exc:
        if isinstance(exc, ModelFileError):
            raise
        raise ModelFileError(f"{path}: unreadable model file ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a {FORMAT} file (format "
                             f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise ModelFileError(f"{path}: format_version {version!r} is not supported by this "
                             f"mrharmony (reads versions 1..{FORMAT_VERSION}); written by "
                             f"mrharmony {meta.get('mrharmony_version', '?')}")
    for name, spec in meta.get("arrays", {}).items():
        if name not in arrays:
            raise ModelFileError(f"{path}: array {name!r} listed in the metadata is missing")
        a = arrays[name]
        if list(a.shape) != spec["shape"] or a.dtype.str != spec["dtype"]:
            raise ModelFileError(f"{path}: array {name!r} has shape {a.shape} dtype "
                                 f"{a.dtype.str}, metadata says {spec}")
    return meta, arrays


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Return the JSON metadata of a model file (validated as :func:`load_model` does)."""
    return _read(Path(path))[0]


def load_model(path: str | Path) -> Any:
    """Load a model written by :func:`save_model`.

    Parameters
    ----------
    path : str or Path
        The model file.

    Returns
    -------
    ComBat or a variant
        The fitted model, of the class named in the file.

    Raises
    ------
    ModelFileError
        Not a model file, an unsupported format version, an unknown model kind, or
        inconsistent arrays.
    """
    path = Path(path)
    meta, arrays = _read(path)
    classes = _model_classes()
    kind = meta.get("model")
    if kind not in classes:
        raise ModelFileError(f"{path}: unknown model kind {kind!r} (known: {sorted(classes)})")
    try:
        return classes[kind]._from_state(meta["state"], arrays)
    except (KeyError, TypeError) as exc:
        raise ModelFileError(f"{path}: model state incomplete or malformed ({exc!r})") from exc
