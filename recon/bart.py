"""A small binding to the BART command-line tool (the Debian ``bart`` package).

Arrays are exchanged as BART ``.cfl``/``.hdr`` file pairs (complex64, column-major, at
least 16 dimensions in BART's order: x, y, z, coils, maps, ...) in a private temporary
directory, and ``bart`` runs as a subprocess. BART ``pics`` scales the data internally;
we pass ``-S`` so that it scales the result back, and :func:`pics` also accepts our
own maps so that results are comparable with :mod:`mrharmony.recon.parallel`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mrharmony.errors import ReconError

__all__ = ["bart", "bart_available", "ecalib", "pics", "read_cfl", "write_cfl"]


def bart_available() -> bool:
    """True when a ``bart`` executable is on ``PATH``."""
    return shutil.which("bart") is not None


def write_cfl(base: str | Path, array: np.ndarray) -> None:
    """Write ``base.hdr`` and ``base.cfl`` (complex64, Fortran order)."""
    base = Path(base)
    arr = np.asarray(array, dtype=np.complex64)
    dims = list(arr.shape) + [1] * max(0, 16 - arr.ndim)
    base.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, dims)) + "\n")
    arr.ravel(order="F").tofile(base.with_suffix(".cfl"))


def read_cfl(base: str | Path) -> np.ndarray:
    """Read a ``.cfl``/``.hdr`` pair; trailing singleton dimensions are dropped."""
    base = Path(base)
    try:
        lines = base.with_suffix(".hdr").read_text().splitlines()
        dims = [int(v) for v in lines[1].split()]
    except (OSError, IndexError, ValueError) as exc:
        raise ReconError(f"{base}.hdr: not a BART header ({exc})") from exc
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    data = np.fromfile(base.with_suffix(".cfl"), dtype=np.complex64)
    if data.size != int(np.prod(dims)):
        raise ReconError(f"{base}.cfl: {data.size} values, header says {dims}")
    return data.reshape(dims, order="F")


def bart(
    args: Sequence[str], inputs: Sequence[np.ndarray], *, n_outputs: int = 1,
    threads: int | None = None,
) -> list[np.ndarray]:
    """Run ``bart ARGS in_0 .. in_k out_0 .. out_m`` and return the outputs.

    Parameters
    ----------
    args : sequence of str
        The BART command and its options, e.g. ``["pics", "-l2", "-r", "0.01"]``.
    inputs : sequence of numpy.ndarray
        Input arrays in BART dimension order.
    n_outputs : int
        Number of output files the command writes.
    threads : int, optional
        ``OMP_NUM_THREADS`` for the run.

    Raises
    ------
    ReconError
        If ``bart`` is missing or exits with an error (its message is included).
    """
    exe = shutil.which("bart")
    if exe is None:
        raise ReconError("bart: the 'bart' executable is not on PATH (apt install bart)")
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(int(threads))
    with tempfile.TemporaryDirectory(prefix="mrharmony-bart-") as tmp:
        ins = []
        for i, arr in enumerate(inputs):
            base = Path(tmp) / f"in{i}"
            write_cfl(base, arr)
            ins.append(str(base))
        outs = [str(Path(tmp) / f"out{i}") for i in range(n_outputs)]
        proc = subprocess.run(
            [exe, *args, *ins, *outs], capture_output=True, text=True, env=env, check=False
        )
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise ReconError(
                f"bart {' '.join(args)}: exit {proc.returncode}: {msg[-1] if msg else ''}"
            )
        return [read_cfl(o) for o in outs]


def _to_bart(x: np.ndarray) -> np.ndarray:
    """Ours ``(coils, x, y[, z])`` -> BART ``(x, y, z, coils)``."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    return np.moveaxis(x, 0, 3)


def _from_bart(x: np.ndarray, nc_axis: bool = True) -> np.ndarray:
    while x.ndim < 4:
        x = x[..., None]
    return np.moveaxis(x, 3, 0) if nc_axis else x


def ecalib(kspace: np.ndarray, *, calib_width: int = 24, n_maps: int = 1) -> np.ndarray:
    """ESPIRiT maps with ``bart ecalib -m N -r W``: ours ``(coils, x, y[, z])`` in/out."""
    squeeze = np.asarray(kspace).ndim == 3
    (maps,) = bart(["ecalib", "-m", str(n_maps), "-r", str(calib_width)], [_to_bart(kspace)])
    out = _from_bart(maps)
    return out[..., 0] if squeeze else out


def pics(
    kspace: np.ndarray,
    maps: np.ndarray,
    *,
    l1_wavelet: float | None = None,
    l2: float | None = None,
    iterations: int | None = None,
    extra: Sequence[str] = (),
) -> np.ndarray:
    """``bart pics`` with ``-S`` (result scaled back); ours ``(coils, x, y[, z])``.

    Parameters
    ----------
    kspace, maps : numpy.ndarray
        complex ``(coils, x, y[, z])``; maps with the same shape.
    l1_wavelet, l2 : float, optional
        ``-R W:7:0:λ`` or ``-l2 -r λ`` (BART's own scaling of λ).
    iterations : int, optional
        ``-i``.

    Returns
    -------
    numpy.ndarray
        complex64 image ``(x, y[, z])``.
    """
    squeeze = np.asarray(kspace).ndim == 3
    args = ["pics", "-S"]
    if l1_wavelet is not None:
        args += ["-R", f"W:7:0:{l1_wavelet}"]
    elif l2 is not None:
        args += ["-l2", "-r", str(l2)]
    if iterations is not None:
        args += ["-i", str(int(iterations))]
    args += list(extra)
    (img,) = bart(args, [_to_bart(kspace), _to_bart(maps)])
    while img.ndim < 3:
        img = img[..., None]
    return img[:, :, 0] if squeeze else img[:, :, :]
