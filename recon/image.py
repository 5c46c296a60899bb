"""The reconstructed image type, :class:`ReconImage`, with its geometry and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mrharmony.recon.geometry import affine_ras, normalised_directions

__all__ = ["ReconImage"]


@dataclass
class ReconImage:
    """One reconstructed image (one slice/slab of one contrast, set and repetition).

    Attributes
    ----------
    data : numpy.ndarray
        complex64 or float32, ``(nx, ny, nz)`` (x = readout, y = phase, z = slice or
        partition) or ``(nx, ny, nz, n)`` for a series (e.g. coils or echoes).
    slice, contrast, repetition, set, average : int
        ISMRMRD counters the image belongs to (``contrast`` = echo index, ``set`` = TI or
        diffusion-encoding index in our sequences).
    position : numpy.ndarray
        (3,) centre of the slice/slab, LPS mm.
    read_dir, phase_dir, slice_dir : numpy.ndarray
        (3,) unit direction cosines (LPS) of the array axes x, y, z.
    field_of_view_mm : numpy.ndarray
        (3,) extent of the image along x, y, z in mm (z: slice thickness for 2D).
    meta : dict
        JSON-serialisable: ``te_ms``, ``tr_ms``, ``ti_ms``, ``flip_deg``,
        ``sequence_name``, ``recon`` settings, and ``map`` for parameter maps.
    """

    data: np.ndarray
    slice: int = 0
    contrast: int = 0
    repetition: int = 0
    set: int = 0
    average: int = 0
    position: np.ndarray = field(default_factory=lambda: np.zeros(3))
    read_dir: np.ndarray = field(default_factory=lambda: np.array([1.0, 0.0, 0.0]))
    phase_dir: np.ndarray = field(default_factory=lambda: np.array([0.0, 1.0, 0.0]))
    slice_dir: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    field_of_view_mm: np.ndarray = field(default_factory=lambda: np.ones(3))
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.position = np.asarray(self.position, dtype=np.float64).reshape(3)
        r, p, s = normalised_directions(self.read_dir, self.phase_dir, self.slice_dir)
        self.read_dir, self.phase_dir, self.slice_dir = r, p, s
        self.field_of_view_mm = np.asarray(self.field_of_view_mm, dtype=np.float64).reshape(3)
        if self.data.ndim == 2:
            self.data = self.data[:, :, None]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(nx, ny, nz)``."""
        return tuple(int(n) for n in self.data.shape[:3])  # type: ignore[return-value]

    @property
    def voxel_size_mm(self) -> tuple[float, float, float]:
        """Voxel edge lengths along x, y, z (mm): field of view / matrix."""
        return tuple(float(f / n) for f, n in zip(self.field_of_view_mm, self.shape, strict=True))

    def affine_ras(self) -> np.ndarray:
        """NIfTI affine (voxel index -> RAS+ mm), see :mod:`mrharmony.recon.geometry`."""
        return affine_ras(
            self.position,
            self.read_dir,
            self.phase_dir,
            self.slice_dir,
            voxel_size_mm=self.voxel_size_mm,
            shape=self.shape,
        )

    def to_ismrmrd_image(self, *, image_index: int = 0, series_index: int = 0) -> Any:
        """Return an :class:`ismrmrd.Image` with this data, geometry and counters.

        The ISMRMRD image array is ``(channels, z, y, x)``; series dimensions become
        channels. Metadata go into the image's XML meta attributes.
        """
        import ismrmrd

        data = np.asarray(self.data)
        if data.ndim == 3:
            data = data[..., None]
        arr = np.ascontiguousarray(np.transpose(data, (3, 2, 1, 0)))
        arr = arr.astype(np.float32) if not np.iscomplexobj(arr) else arr.astype(np.complex64)
        img = ismrmrd.Image.from_array(arr, transpose=False)
        img.field_of_view = tuple(float(v) for v in self.field_of_view_mm)
        img.position = tuple(float(v) for v in self.position)
        img.read_dir = tuple(float(v) for v in self.read_dir)
        img.phase_dir = tuple(float(v) for v in self.phase_dir)
        img.slice_dir = tuple(float(v) for v in self.slice_dir)
        img.slice = int(self.slice)
        img.contrast = int(self.contrast)
        img.repetition = int(self.repetition)
        img.set = int(self.set)
        img.average = int(self.average)
        img.image_index = int(image_index)
        img.image_series_index = int(series_index)
        meta = ismrmrd.Meta()
        for key, value in self.meta.items():
            if isinstance(value, int | float | str):
                meta[key] = str(value)
        img.attribute_string = meta.serialize()
        return img
