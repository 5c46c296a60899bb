"""The :class:`Phantom` type: per-voxel tissue maps with an affine, saved as NIfTI + JSON.

A phantom is a set of co-registered 3-D maps ``(nx, ny, nz)`` (2-D phantoms have
``nz == 1``) plus a NIfTI affine mapping voxel indices to RAS+ millimetres:

=====================  ===========  ==========================================================
map                    unit         meaning
=====================  ===========  ==========================================================
``pd``                 1            proton density relative to pure water, in [0, 1]
``t1_ms``              ms           longitudinal relaxation time
``t2_ms``              ms           transverse relaxation time, ``T2 <= T1``
``t2star_ms``          ms           effective transverse relaxation, ``T2* <= T2``
``adc_mm2_s``          mm^2/s       mean diffusivity, in [0, 4e-3) (free water at 37 C ~3e-3)
``b0_hz``              Hz           off-resonance of the object itself (susceptibility)
``labels``             label        int16 tissue/vial label, 0 = background
``dti_mm2_s``          mm^2/s       optional tensor ``(nx, ny, nz, 6)``: Dxx, Dxy, Dxz, Dyy,
                                    Dyz, Dzz in RAS axes
``chemical_shift_ppm`` ppm          optional chemical shift (e.g. -3.4 for fat), else 0
=====================  ===========  ==========================================================

Background voxels (``pd == 0``) carry the finite placeholder values
``T1 = T2 = T2* = 1 ms`` and ``ADC = 0`` so that rates ``1/T`` never divide by zero.

On disk a phantom is one directory holding one gzipped NIfTI per map (``pd.nii.gz``,
``t1_ms.nii.gz``, ...) and ``phantom.json`` with the format name and version, the field
strength, the label names, the unit, dtype, shape and SHA-256 of every map file, the
float64 affine and the provenance metadata. Maps are stored in their in-memory dtype
(float32, labels int16) without scaling, so a save/load round trip is bit-exact; the
affine is taken from the JSON (float64; NIfTI stores it as float32) after checking that
every NIfTI header agrees with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from mrharmony.errors import PhantomError
from mrharmony.fileio import atomic_directory
from mrharmony.formats.nifti import nifti_image, save_nifti

__all__ = [
    "BACKGROUND_T_MS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAP_UNITS",
    "Phantom",
    "load_phantom",
]

FORMAT_NAME = "mrharmony-phantom"
FORMAT_VERSION = 1
JSON_NAME = "phantom.json"

#: Unit of every map, as written to ``phantom.json`` and checked on load.
MAP_UNITS: dict[str, str] = {
    "pd": "1",
    "t1_ms": "ms",
    "t2_ms": "ms",
    "t2star_ms": "ms",
    "adc_mm2_s": "mm2/s",
    "b0_hz": "Hz",
    "labels": "label",
    "dti_mm2_s": "mm2/s",
    "chemical_shift_ppm": "ppm",
}
_REQUIRED_MAPS = ("pd", "t1_ms", "t2_ms", "t2star_ms", "adc_mm2_s", "b0_hz", "labels")
_OPTIONAL_MAPS = ("dti_mm2_s", "chemical_shift_ppm")

#: Relaxation placeholder written into background voxels (pd == 0), ms.
BACKGROUND_T_MS = 1.0
#: Upper limit of a physical ADC, mm^2/s (free water at 37 C is ~3.0e-3).
MAX_ADC_MM2_S = 4e-3
#: Largest accepted |off-resonance| of the object itself, Hz.
MAX_ABS_B0_HZ = 1e4
#: Largest accepted |chemical shift|, ppm.
MAX_ABS_CS_PPM = 100.0
#: Relative tolerance of the ordering checks T2 <= T1 and T2* <= T2 (float32 rounding).
_ORDER_RTOL = 1e-6


def _first_index(bad: np.ndarray) -> tuple[int, ...]:
    """Index of the first True voxel of a boolean map (C order)."""
    flat = int(np.argmax(bad.reshape(-1)))
    return tuple(int(i) for i in np.unravel_index(flat, bad.shape))


def _report(name: str, bad: np.ndarray, what: str) -> None:
    """Raise a :class:`PhantomError` naming the map when any voxel of ``bad`` is True."""
    count = int(np.count_nonzero(bad))
    if count:
        index = _first_index(bad)
        raise PhantomError(f"{name}: {count} voxels have {what} (first at index {index})")


@dataclass
class Phantom:
    """Co-registered tissue maps of a numerical phantom.

    Parameters
    ----------
    pd : numpy.ndarray
        ``(nx, ny, nz)`` proton density in [0, 1], stored as float32.
    t1_ms, t2_ms, t2star_ms : numpy.ndarray
        ``(nx, ny, nz)`` relaxation times in ms, float32, ``T2* <= T2 <= T1``.
    adc_mm2_s : numpy.ndarray
        ``(nx, ny, nz)`` mean diffusivity in mm^2/s, float32, in [0, 4e-3).
    b0_hz : numpy.ndarray
        ``(nx, ny, nz)`` off-resonance of the object itself in Hz, float32.
    labels : numpy.ndarray
        ``(nx, ny, nz)`` int16 tissue/vial label, 0 = background.
    label_names : dict[int, str]
        Name of every non-zero label present in ``labels``.
    affine : numpy.ndarray
        ``(4, 4)`` float64 voxel index -> RAS+ mm.
    field_t : float
        Field strength (T) the relaxation values belong to.
    name : str, optional
        Short name (``"system"``, ``"brain"``, ``"sub-001"``, ...).
    dti_mm2_s : numpy.ndarray, optional
        ``(nx, ny, nz, 6)`` diffusion tensor Dxx, Dxy, Dxz, Dyy, Dyz, Dzz (RAS), mm^2/s.
    chemical_shift_ppm : numpy.ndarray, optional
        ``(nx, ny, nz)`` chemical shift in ppm (e.g. -3.4 for fat).
    metadata : dict, optional
        JSON-serialisable provenance (generator, parameters, references).

    Notes
    -----
    Arrays are converted to their canonical dtypes (float32 maps, int16 labels,
    float64 affine) on construction, and the phantom is validated
    (:meth:`validate`); an inconsistent phantom raises :class:`PhantomError` naming
    the map.
    """

    pd: np.ndarray
    t1_ms: np.ndarray
    t2_ms: np.ndarray
    t2star_ms: np.ndarray
    adc_mm2_s: np.ndarray
    b0_hz: np.ndarray
    labels: np.ndarray
    label_names: dict[int, str]
    affine: np.ndarray
    field_t: float
    name: str = ""
    dti_mm2_s: np.ndarray | None = None
    chemical_shift_ppm: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("pd", "t1_ms", "t2_ms", "t2star_ms", "adc_mm2_s", "b0_hz"):
            setattr(self, key, np.ascontiguousarray(getattr(self, key), dtype=np.float32))
        for key in _OPTIONAL_MAPS:
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, np.ascontiguousarray(value, dtype=np.float32))
        labels = np.asarray(self.labels)
        if labels.dtype.kind not in "iub":
            raise PhantomError(f"labels: dtype {labels.dtype} is not an integer type")
        if labels.size and (labels.min() < np.iinfo(np.int16).min
                            or labels.max() > np.iinfo(np.int16).max):
            raise PhantomError("labels: values do not fit in int16")
        self.labels = np.ascontiguousarray(labels, dtype=np.int16)
        self.affine = np.array(self.affine, dtype=np.float64)
        try:
            self.label_names = {int(k): str(v) for k, v in dict(self.label_names).items()}
        except (TypeError, ValueError) as exc:
            raise PhantomError(f"label_names: keys must be integers ({exc})") from None
        self.field_t = float(self.field_t)
        self.metadata = dict(self.metadata)
        self.validate()

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        """Matrix ``(nx, ny, nz)``."""
        return tuple(int(n) for n in self.pd.shape)  # type: ignore[return-value]

    @property
    def voxel_size_mm(self) -> tuple[float, float, float]:
        """Voxel edge lengths (mm): norms of the affine's first three columns."""
        sizes = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(s) for s in sizes)  # type: ignore[return-value]

    @property
    def is_2d(self) -> bool:
        """True for a single-slice phantom (``nz == 1``)."""
        return self.shape[2] == 1

    @property
    def mask(self) -> np.ndarray:
        """Boolean object mask, ``pd > 0``."""
        return self.pd > 0

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (|det| of the affine's 3x3 part / 1000)."""
        return float(abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)

    def positions_mm(self, mask_only: bool = True) -> np.ndarray:
        """RAS+ positions of voxel centres.

        Parameters
        ----------
        mask_only : bool, optional
            Only the voxels with ``pd > 0`` (default) or all voxels.

        Returns
        -------
        numpy.ndarray
            ``(N, 3)`` float64 positions in mm, voxels in C order (the order of
            ``pd.reshape(-1)`` restricted to the mask).
        """
        if mask_only:
            ijk = np.stack(np.nonzero(self.mask), axis=1).astype(np.float64)
        else:
            grid = np.indices(self.shape, dtype=np.float64)
            ijk = grid.reshape(3, -1).T
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def t2prime_ms(self) -> np.ndarray:
        """Reversible dephasing time ``T2' = 1 / (1/T2* - 1/T2)`` (ms), ``inf`` where equal.

        Returns
        -------
        numpy.ndarray
            ``(nx, ny, nz)`` float32.
        """
        r2p = 1.0 / self.t2star_ms.astype(np.float64) - 1.0 / self.t2_ms.astype(np.float64)
        with np.errstate(divide="ignore"):
            out = np.where(r2p > 0, 1.0 / np.maximum(r2p, 1e-300), np.inf)
        return out.astype(np.float32)

    def maps(self) -> dict[str, np.ndarray]:
        """All maps present, by file name stem (``pd``, ``t1_ms``, ..., ``labels``)."""
        out = {key: getattr(self, key) for key in _REQUIRED_MAPS}
        for key in _OPTIONAL_MAPS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def with_maps(self, **changes: Any) -> Phantom:
        """Copy with some fields replaced (validated again).

        Parameters
        ----------
        **changes
            Field name -> new value (e.g. ``t1_ms=..., name="sub-002"``).

        Returns
        -------
        Phantom
        """
        return replace(self, **changes)

    def slice_z(self, index: int) -> Phantom:
        """One axial slice as a 2-D phantom (``nz == 1``) with the matching affine.

        Parameters
        ----------
        index : int
            Slice index along the third array axis, ``0 <= index < nz``.

        Returns
        -------
        Phantom
        """
        nz = self.shape[2]
        if not 0 <= index < nz:
            raise PhantomError(f"slice index {index} outside [0, {nz - 1}]")
        sl = np.s_[:, :, index:index + 1]
        affine = self.affine.copy()
        affine[:3, 3] = self.affine[:3, :3] @ np.array([0.0, 0.0, float(index)]) + affine[:3, 3]
        changes: dict[str, Any] = {key: getattr(self, key)[sl] for key in _REQUIRED_MAPS}
        for key in _OPTIONAL_MAPS:
            value = getattr(self, key)
            changes[key] = None if value is None else value[sl]
        present = set(np.unique(changes["labels"]).tolist())
        changes["label_names"] = {k: v for k, v in self.label_names.items() if k in present}
        changes["affine"] = affine
        changes["metadata"] = {**self.metadata, "slice_index": int(index)}
        return replace(self, **changes)

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check shapes, dtypes, affine, label names and physical ranges.

        Raises
        ------
        PhantomError
            Naming the first offending map and the limit, e.g.
            ``"t2_ms: 412 voxels have T2 > T1 (first at index (3, 4, 0))"``.
        """
        shape = self.pd.shape
        if self.pd.ndim != 3:
            raise PhantomError(f"pd: expected a 3-D array (nx, ny, nz), got shape {shape}")
        if min(shape) < 1:
            raise PhantomError(f"pd: empty shape {shape}")
        for key in _REQUIRED_MAPS[1:]:
            got = getattr(self, key).shape
            if got != shape:
                raise PhantomError(f"{key}: shape {got} differs from pd shape {shape}")
        if self.dti_mm2_s is not None and self.dti_mm2_s.shape != (*shape, 6):
            raise PhantomError(
                f"dti_mm2_s: shape {self.dti_mm2_s.shape}, expected {(*shape, 6)}")
        if self.chemical_shift_ppm is not None and self.chemical_shift_ppm.shape != shape:
            raise PhantomError(f"chemical_shift_ppm: shape {self.chemical_shift_ppm.shape} "
                               f"differs from pd shape {shape}")
        self._validate_affine()
        if not (math.isfinite(self.field_t) and 0 < self.field_t <= 21.1):
            raise PhantomError(f"field_t: {self.field_t} T outside (0, 21.1]")

        for key, arr in self.maps().items():
            if key != "labels":
                _report(key, ~np.isfinite(arr), "non-finite values")
        _report("pd", (self.pd < 0) | (self.pd > 1), "PD outside [0, 1]")
        for key, label in (("t1_ms", "T1"), ("t2_ms", "T2"), ("t2star_ms", "T2*")):
            _report(key, getattr(self, key) <= 0, f"{label} <= 0 ms")
        _report("t2_ms", self.t2_ms > self.t1_ms * (1 + _ORDER_RTOL), "T2 > T1")
        _report("t2star_ms", self.t2star_ms > self.t2_ms * (1 + _ORDER_RTOL), "T2* > T2")
        _report("adc_mm2_s", (self.adc_mm2_s < 0) | (self.adc_mm2_s >= MAX_ADC_MM2_S),
                f"ADC outside [0, {MAX_ADC_MM2_S}) mm2/s")
        _report("b0_hz", np.abs(self.b0_hz) > MAX_ABS_B0_HZ, f"|B0| > {MAX_ABS_B0_HZ:g} Hz")
        if self.chemical_shift_ppm is not None:
            _report("chemical_shift_ppm", np.abs(self.chemical_shift_ppm) > MAX_ABS_CS_PPM,
                    f"|chemical shift| > {MAX_ABS_CS_PPM:g} ppm")
        if self.dti_mm2_s is not None:
            diag = self.dti_mm2_s[..., [0, 3, 5]]
            _report("dti_mm2_s", ((diag < 0) | (diag >= MAX_ADC_MM2_S)).any(axis=-1),
                    f"a diagonal tensor element outside [0, {MAX_ADC_MM2_S}) mm2/s")
        _report("labels", self.labels < 0, "negative labels")
        present = set(np.unique(self.labels).tolist()) - {0}
        missing = sorted(present - set(self.label_names))
        if missing:
            raise PhantomError(f"label_names: labels {missing} present in labels have no name")

    def _validate_affine(self) -> None:
        aff = self.affine
        if aff.shape != (4, 4):
            raise PhantomError(f"affine: shape {aff.shape}, expected (4, 4)")
        if not np.all(np.isfinite(aff)):
            raise PhantomError("affine: non-finite entries")
        if not np.allclose(aff[3], [0.0, 0.0, 0.0, 1.0]):
            raise PhantomError(f"affine: last row {aff[3].tolist()} is not [0, 0, 0, 1]")
        if abs(np.linalg.det(aff[:3, :3])) < 1e-9:
            raise PhantomError("affine: singular 3x3 part (zero voxel volume)")

    # ---------------------------------------------------------------------- I/O
    def save(self, directory: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the phantom as NIfTI maps + ``phantom.json`` (atomically).

        Parameters
        ----------
        directory : path
            Output directory; created. An existing non-empty directory is replaced only
            with ``force=True``.
        force : bool, optional
            Replace an existing phantom directory.

        Returns
        -------
        pathlib.Path
            The directory written.

        Raises
        ------
        PhantomError
            If the directory exists and is not empty (without ``force``), or the metadata
            is not JSON-serialisable.
        """

        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise PhantomError(f"{out}: exists and is not a directory")
        if out.exists() and any(out.iterdir()) and not force:
            raise PhantomError(f"{out}: exists and is not empty (use --force / "
                               "force=True to replace it)")
        try:
            meta_text = json.dumps(self.metadata)
        except (TypeError, ValueError) as exc:
            raise PhantomError(f"metadata: not JSON-serialisable ({exc})") from None
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(out) as tmp:
            entries: dict[str, Any] = {}
            for key, arr in self.maps().items():
                fname = f"{key}.nii.gz"
                save_nifti(nifti_image(arr, self.affine), tmp / fname)
                entries[key] = {
                    "file": fname,
                    "unit": MAP_UNITS[key],
                    "dtype": str(arr.dtype),
                    "shape": list(arr.shape),
                    "sha256": _sha256(tmp / fname),
                }
            doc = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "name": self.name,
                "field_t": self.field_t,
                "shape": list(self.shape),
                "affine": self.affine.tolist(),
                "label_names": {str(k): v for k, v in sorted(self.label_names.items())},
                "maps": entries,
                "metadata": json.loads(meta_text),
            }
            (tmp / JSON_NAME).write_text(json.dumps(doc, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Phantom:
        """Read a phantom written by :meth:`save`, checking integrity and consistency.

        Parameters
        ----------
        directory : path
            Directory holding ``phantom.json`` and the NIfTI maps.

        Returns
        -------
        Phantom

        Raises
        ------
        PhantomError
            Missing/corrupt JSON or map file (SHA-256 mismatch), wrong format version,
            unit, dtype or shape, NIfTI affine disagreeing with the JSON affine, or any
            physical-range violation (naming the map).
        """
        import nibabel as nib

        root = Path(directory)
        jpath = root / JSON_NAME
        if not jpath.is_file():
            raise PhantomError(f"{root}: no {JSON_NAME} (not a phantom directory)")
        try:
            doc = json.loads(jpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PhantomError(f"{jpath}: unreadable JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise PhantomError(f"{jpath}: format is not {FORMAT_NAME!r}")
        if doc.get("version") != FORMAT_VERSION:
            raise PhantomError(f"{jpath}: format version {doc.get('version')!r} is not "
                               f"supported (expected {FORMAT_VERSION})")
        for key in ("affine", "field_t", "label_names", "maps", "shape"):
            if key not in doc:
                raise PhantomError(f"{jpath}: missing key {key!r}")
        affine = np.asarray(doc["affine"], dtype=np.float64)
        entries = doc["maps"]
        unknown = sorted(set(entries) - set(MAP_UNITS))
        if unknown:
            raise PhantomError(f"{jpath}: unknown maps {unknown}")
        missing = [k for k in _REQUIRED_MAPS if k not in entries]
        if missing:
            raise PhantomError(f"{jpath}: required maps {missing} are not listed")
        arrays: dict[str, np.ndarray] = {}
        for key, entry in entries.items():
            if entry.get("unit") != MAP_UNITS[key]:
                raise PhantomError(f"{key}: unit {entry.get('unit')!r} in {JSON_NAME}, "
                                   f"expected {MAP_UNITS[key]!r}")
            path = root / str(entry.get("file", ""))
            if not path.is_file():
                raise PhantomError(f"{key}: file {path} is missing")
            if _sha256(path) != entry.get("sha256"):
                raise PhantomError(f"{key}: {path.name} is corrupt (SHA-256 differs from "
                                   f"{JSON_NAME})")
            try:
                img = nib.load(path)
                data = np.asanyarray(img.dataobj)
            except Exception as exc:  # nibabel raises many types for broken files
                raise PhantomError(f"{key}: cannot read {path.name} ({exc})") from None
            if str(data.dtype) != entry.get("dtype"):
                raise PhantomError(f"{key}: dtype {data.dtype} differs from "
                                   f"{entry.get('dtype')} in {JSON_NAME}")
            if list(data.shape) != list(entry.get("shape", [])):
                raise PhantomError(f"{key}: shape {data.shape} differs from "
                                   f"{entry.get('shape')} in {JSON_NAME}")
            # NIfTI stores the affine in float32: compare at that precision.
            scale = max(1.0, float(np.abs(affine).max()))
            if not np.allclose(img.affine, affine, rtol=0, atol=1e-5 * scale):
                raise PhantomError(f"{key}: NIfTI affine disagrees with the {JSON_NAME} "
                                   f"affine")
            arrays[key] = data
        label_names = {int(k): str(v) for k, v in doc["label_names"].items()}
        return cls(
            **arrays,
            label_names=label_names,
            affine=affine,
            field_t=float(doc["field_t"]),
            name=str(doc.get("name", "")),
            metadata=dict(doc.get("metadata", {})),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Phantom):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
                    return False
                if not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]


def load_phantom(directory: str | os.PathLike[str]) -> Phantom:
    """Read a phantom directory (see :meth:`Phantom.load`).

    Parameters
    ----------
    directory : path
        Directory holding ``phantom.json`` and the NIfTI maps.

    Returns
    -------
    Phantom
    """
    return Phantom.load(directory)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
