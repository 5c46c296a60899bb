"""Acquisitions as a scanner delivers them: real-time pacing and synthetic test scans.

:func:`realtime_pace` plays acquisitions to a streaming server in acquisition order:
noise scans first, then every readout at its ``acquisition_time_stamp`` (2.5 ms ticks,
relative to the first readout). The virtual scanner that simulates a sequence on a
phantom and streams it (``mrharmony scan``) lives in the orchestration layer
(:mod:`mrharmony.study.scan`), because it drives the simulator and recon together.

:func:`synthetic_cartesian_scan` builds a small multi-coil, multi-slice Cartesian scan
directly in memory (an analytic ellipse object and Gaussian coil sensitivities, FFT
convention of the sequence library), for tests and benchmarks that need data fast.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ismrmrd
import numpy as np

from mrharmony.errors import StreamError
from mrharmony.formats.flags import flag_mask, has_flag

__all__ = ["TICK_S", "realtime_pace", "synthetic_cartesian_scan"]

TICK_S = 2.5e-3  # ISMRMRD acquisition_time_stamp tick used by mrharmony.simulation


def synthetic_cartesian_scan(
    *,
    nx: int = 64,
    ny: int = 64,
    n_coils: int = 4,
    n_slices: int = 3,
    noise_scans: int = 1,
    fov_mm: float = 220.0,
    slice_thickness_mm: float = 5.0,
    slice_gap_mm: float = 1.0,
    noise_sigma: float = 0.01,
    seed: int = 0,
) -> tuple[Any, list[Any]]:
    """A fully sampled 2-D multi-slice Cartesian scan, noise scans first.

    Parameters
    ----------
    nx, ny : int
        Readout samples and phase-encoding lines (no oversampling).
    n_coils : int
        Receive channels (Gaussian sensitivities around the object).
    n_slices : int
        Slices, acquired one after another; the last line of each carries
        ``ACQ_LAST_IN_SLICE``.
    noise_scans : int
        Noise-measurement acquisitions before the imaging lines.
    fov_mm, slice_thickness_mm, slice_gap_mm : float
        Geometry (mm).
    noise_sigma : float
        Standard deviation of the complex Gaussian noise per sample (real and imaginary).
    seed : int
        Seed of the noise.

    Returns
    -------
    header : ismrmrd.xsd.ismrmrdHeader
    acquisitions : list of ismrmrd.Acquisition
    """
    import ismrmrd.xsd as mrd

    if min(nx, ny, n_coils, n_slices) < 1:
        raise StreamError("synthetic_cartesian_scan: nx, ny, n_coils and n_slices must be >= 1")
    rng = np.random.default_rng(seed)
    x = (np.arange(nx) - nx // 2) / (nx / 2)
    y = (np.arange(ny) - ny // 2) / (ny / 2)
    xx, yy = np.meshgrid(x, y, indexing="ij")  # (nx, ny)
    angles = 2 * np.pi * np.arange(n_coils) / n_coils
    sens = np.exp(-((xx[None] - 0.7 * np.cos(angles)[:, None, None]) ** 2
                    + (yy[None] - 0.7 * np.sin(angles)[:, None, None]) ** 2) / 0.8)
    sens = (sens * np.exp(1j * angles)[:, None, None]).astype(np.complex64)
    thick = slice_thickness_mm + slice_gap_mm
    header = mrd.ismrmrdHeader(
        version=2,
        acquisitionSystemInformation=mrd.acquisitionSystemInformationType(
            systemVendor="mrharmony", systemModel="synthetic", systemFieldStrength_T=3.0,
            receiverChannels=n_coils),
        experimentalConditions=mrd.experimentalConditionsType(H1resonanceFrequency_Hz=127728000),
        encoding=[mrd.encodingType(
            encodedSpace=mrd.encodingSpaceType(
                matrixSize=mrd.matrixSizeType(x=nx, y=ny, z=1),
                fieldOfView_mm=mrd.fieldOfViewMm(x=fov_mm, y=fov_mm, z=slice_thickness_mm)),
            reconSpace=mrd.encodingSpaceType(
                matrixSize=mrd.matrixSizeType(x=nx, y=ny, z=1),
                fieldOfView_mm=mrd.fieldOfViewMm(x=fov_mm, y=fov_mm, z=slice_thickness_mm)),
            encodingLimits=mrd.encodingLimitsType(
                kspace_encoding_step_1=mrd.limitType(minimum=0, maximum=ny - 1, center=ny // 2),
                slice=mrd.limitType(minimum=0, maximum=n_slices - 1, center=0)),
            trajectory=mrd.trajectoryType.CARTESIAN)],
        sequenceParameters=mrd.sequenceParametersType(TR=[10.0], TE=[4.0], flipAngle_deg=[15.0],
                                                      sequence_type="synthetic_gre"),
    )
    acqs: list[Any] = []
    counter = 0

    def new(data: np.ndarray, flags: int) -> Any:
        nonlocal counter
        acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, np.complex64))
        acq.flags = flags
        acq.scan_counter = counter
        acq.sample_time_us = 5.0
        acq.center_sample = nx // 2
        acq.read_dir[:] = (1.0, 0.0, 0.0)
        acq.phase_dir[:] = (0.0, 1.0, 0.0)
        acq.slice_dir[:] = (0.0, 0.0, 1.0)
        counter += 1
        return acq

    for _ in range(noise_scans):
        noise = (rng.standard_normal((n_coils, nx)) + 1j * rng.standard_normal((n_coils, nx)))
        acqs.append(new(noise_sigma * noise, int(flag_mask("IS_NOISE_MEASUREMENT"))))
    for s in range(n_slices):
        # a slice-dependent ellipse pair, so every slice's image differs
        obj = ((xx / 0.75) ** 2 + (yy / 0.9) ** 2 < 1).astype(np.float32)
        obj += 0.5 * (((xx - 0.2 * (s - n_slices / 2) / n_slices) / 0.25) ** 2
                      + (yy / 0.35) ** 2 < 1)
        coil_img = sens * obj[None]
        k = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(coil_img, axes=(1, 2)), axes=(1, 2),
                                        norm="ortho"), axes=(1, 2)).astype(np.complex64)
        k += (noise_sigma * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
              ).astype(np.complex64)
        z_mm = (s - (n_slices - 1) / 2) * thick
        for line in range(ny):
            flags = 0
            if line == 0:
                flags |= int(flag_mask("FIRST_IN_SLICE"))
            if line == ny - 1:
                flags |= int(flag_mask("LAST_IN_SLICE"))
                if s == n_slices - 1:
                    flags |= int(flag_mask("LAST_IN_MEASUREMENT"))
            acq = new(k[:, :, line], flags)
            acq.idx.kspace_encode_step_1 = line
            acq.idx.slice = s
            acq.position[:] = (0.0, 0.0, z_mm)
            acq.acquisition_time_stamp = round((s * ny + line) * 10e-3 / TICK_S)
            acqs.append(acq)
    return header, acqs


def realtime_pace(acquisitions: list[Any], *, speed: float = 1.0):
    """A ``pace`` callback for :func:`~mrharmony.recon.stream.client.stream_acquisitions`
    that sends each acquisition at its ``acquisition_time_stamp`` (2.5 ms ticks).

    Parameters
    ----------
    acquisitions : list of ismrmrd.Acquisition
        The acquisitions that will be sent (noise scans are sent at once).
    speed : float
        Playback speed (2.0 = twice real time).
    """
    if speed <= 0:
        raise StreamError(f"speed: {speed} must be > 0")
    imaging = [a for a in acquisitions if not has_flag(a.flags, "IS_NOISE_MEASUREMENT")]
    t0_tick = min((int(a.acquisition_time_stamp) for a in imaging), default=0)
    state: dict[str, float] = {}

    async def pace(_i: int, acq: Any, _result: Any) -> None:
        if has_flag(acq.flags, "IS_NOISE_MEASUREMENT"):
            return
        start = state.setdefault("start", time.perf_counter())
        due = start + (int(acq.acquisition_time_stamp) - t0_tick) * TICK_S / speed
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    return pace
