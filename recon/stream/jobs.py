"""Reconstruction jobs of the streaming server: what runs in its worker pool.

:func:`reconstruct_to_mrd` reconstructs one group (a slice with the noise scans) into
serialised MRD images; ``_recon_job_blobs`` is the pool entry point (acquisitions as wire
bytes in, decoded in the worker; images as bytes out), the same for thread and process
pools. The thread caps (BLAS/OpenMP through ``threadpoolctl``, the Cartesian recon's SciPy
FFT workers) keep ``workers x threads`` at the number of cores.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import replace
from typing import Any

import ismrmrd
import numpy as np

from mrharmony.errors import StreamError
from mrharmony.formats.header import parse_ismrmrd_header
from mrharmony.recon.stream.protocol import decode_acquisitions

__all__ = ["reconstruct_to_mrd"]


@functools.lru_cache(maxsize=32)
def _header_from_xml(xml: str) -> Any:
    return parse_ismrmrd_header(xml, source="HEADER", error=StreamError)


def _to_mrd_bytes(images: list[Any]) -> list[bytes]:
    out = []
    for im in images:
        meta = dict(im.meta)
        if "recon" in meta:
            meta["mrharmony_recon"] = json.dumps(meta["recon"], default=str)
        img = replace(im, meta=meta).to_ismrmrd_image()
        img.image_type = (ismrmrd.IMTYPE_COMPLEX if np.iscomplexobj(im.data)
                          else ismrmrd.IMTYPE_MAGNITUDE)
        out.append(img.to_bytes())
    return out


def reconstruct_to_mrd(header: Any, acquisitions: list[Any], *, method: str,
                       backend: str) -> list[bytes]:
    """Reconstruct one group and return serialised MRD images (IMAGE payloads, no id).

    Parameters
    ----------
    header : ismrmrd.xsd.ismrmrdHeader
    acquisitions : list of ismrmrd.Acquisition
        Noise scans and all acquisitions of one slice.
    method, backend : str
        See :func:`mrharmony.recon.reconstruct_acquisitions`.

    Returns
    -------
    list of bytes
        One :meth:`ismrmrd.Image.to_bytes` per image.
    """
    from mrharmony.recon.pipeline import reconstruct_acquisitions

    images = reconstruct_acquisitions(header, acquisitions, method=method, backend=backend)
    return _to_mrd_bytes(images)


def _recon_job_blobs(header_xml: str, blobs: list[bytes], method: str,
                     backend: str) -> list[bytes]:
    """Pool entry point (threads or processes): acquisitions as wire bytes in, images as
    bytes out."""
    header = _header_from_xml(header_xml)
    acqs = decode_acquisitions(blobs)  # batched np.frombuffer decode, same as from_bytes
    return reconstruct_to_mrd(header, acqs, method=method, backend=backend)


def _limit_fft_threads(threads: int) -> int | None:
    """Cap the threads of the Cartesian recon's SciPy FFTs; return the previous cap.

    ``mrharmony.recon.cartesian`` passes ``workers=os.cpu_count()`` to every
    ``scipy.fft`` call (a module constant that ``threadpoolctl`` does not see), so with
    ``W`` recon workers on ``C`` cores the server would run ``W x C`` FFT threads. The
    workers are the parallelism; each FFT gets ``threads``. None if the module has no
    such constant (nothing to cap).
    """
    from mrharmony.recon import cartesian

    previous = getattr(cartesian, "_WORKERS", None)
    if isinstance(previous, int):
        cartesian._WORKERS = max(1, int(threads))
        return previous
    return None


def _limit_worker_threads(threads: int) -> None:
    """Process-pool initializer: cap BLAS/OpenMP and FFT threads for the worker's
    lifetime."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    _limit_fft_threads(threads)


def _warm_up() -> int:
    """Run a tiny reconstruction in a pool worker, so the first real slice does not pay
    for imports and FFT set-up; the short sleep spreads the calls over all workers."""
    from mrharmony.recon.stream.scanner import synthetic_cartesian_scan

    header, acqs = synthetic_cartesian_scan(nx=16, ny=16, n_coils=2, n_slices=1)
    reconstruct_to_mrd(header, acqs, method="auto", backend="numpy")
    time.sleep(0.2)
    return os.getpid()
