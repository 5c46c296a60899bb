"""Parallel-imaging round trips of the accelerated builders on the brain phantom.

For tse (R = 2), epi (R = 2), dwi_epi (R = 2, b = 0 and one b-value), gre3d and mprage
(R = 2 x 2, 24 x 8 calibration lines): the fully sampled protocol and the accelerated
one (EPI: a separate reference scan) are simulated on the same brain
phantom at a 32-channel site (siemens-prisma-3t, noise off), reconstructed with
``grappa`` and ``sense`` from the header alone, and compared with the fully sampled
reconstruction of the same simulation (magnitude NRMSE, ``tests/metrics.py``): GRAPPA
against the FFT recon, SENSE against the SENSE recon of the fully sampled data (the
ESPIRiT mask is the same on both; 3-D: against the FFT recon inside the SENSE support,
see ``_errors``). gre2d is in ``tests/test_builders_acceleration.py``.

EPI is simulated at the site with its B0 residual shimmed away (``residual_ppm = 0``):
with it, R = 2 halves the echo spacing per ky line and so halves the geometric
distortion along the phase axis, which is physics, not reconstruction; the site as it
is gives 0.07 for both methods (measured; the test with it is an xfail(strict)). The
same R = 2 lines taken from the fully sampled simulation (retrospective) reconstruct
to 0.004 (grappa) and 0.02 (sense) at the site as it is.

dwi_epi (spin echo, z crushers around the 180 deg pulse, z diffusion lobes) is simulated
with 128 isochromats per voxel, not 8: the 2-D phantom's isochromats are spread through z
over an extent ``L`` chosen from the z gradient moments between RF pulses
(``mrharmony.simulation.spins.through_plane_extent``), and the R = 2 sequence's moments
happen to share a small unit (0.555 cycles per slice thickness: crusher 11, spoiler 22,
b = 1000 lobe 179 units), so ``L`` = 21.8 mm for a 4.0 mm slice (the fully sampled one:
8.1 mm, no common unit). With 8 isochromats only 2 then lie in the slice and the
unwanted pathways (180 deg FID, stimulated echoes) no longer cancel: the b = 0 k-space
centre line came out at 0.08 x (R = 2) and 1.8 x (fully sampled) of its converged value,
hence the old 0.92 / 0.92. Measured RMS of that line (b = 0 / b = 1000), full and R = 2:
8 isochromats 3.84 / 0.96 and 0.168 / 0.297; 64: R = 2 3.77 / 0.81 (b = 0 still 1.8 x);
128: 2.137 / 0.816 and 2.136 / 0.802; 256: 2.138 / 0.816 and 2.137 / 0.802; 512: 2.135 /
0.815 and 2.137 / 0.831 (converged at 128 to within 2 %).
The sequences themselves agree: same TE/2 (65.0 ms) and echo at the k-space centre, zero
net moment there, for the b = 0 and b = 1000 shots and the reference scan.

tse (slice-selective CPMG, 8 echoes, crushers) is simulated with 256 isochromats per voxel
for the same reason. Its error was once put down to R = 2 changing the echo-to-ky
ordering; it is the isochromat count. Measured NRMSE (grappa / sense) per isochromat count:
32 0.087 / 0.090, 128 0.053 / 0.052, 256 0.0227 / 0.0232, 512 0.0227 / 0.0232. The k-space
centre line (ky = 16, echo 4 in both orderings) is converged already at 32 (RMS 6.566 full
/ 6.562 R = 2 against 6.542 / 6.539 at 512, 0.4 %), but the off-centre lines are not, and
err differently in the two scans: largest line-RMS deviation from 512, full / R = 2,
8.7 % / 5.4 % at 32, 6.4 % / 1.9 % at 128, 0.1 % / 0.1 % at 256. The ordering itself is visible
in the converged raw data (line RMS, R = 2 over fully sampled: 1.000 on the 14 lines both
acquire at the same echo, 0.89 to 1.14 on the 14 acquired one echo apart, or 8 vs 1 at
ky = 0, 2); it can account for at most the 0.023 left (not separated further).

History of gre3d and mprage (R = 2 x 2 along ky and kz, 24 x 8 ACS, first at
32 x 32 x 12 in a 120 mm slab = FOV, 32 isochromats, spoiling as played): measured
(grappa / sense) gre3d 0.28 / 0.83, mprage 0.115 / 0.735. Two recon faults,
fixed (``tests/test_recon_accelerated_3d.py``): ESPIRiT's 6-wide kernel on the 8
calibration partitions left eigenvalues below the crop on most of the object (maps zero,
hence SENSE 0.8), now at most half the calibration width per axis (6, 6, 4); 3-D GRAPPA
with 4 x 4 source blocks overfitted the 24 x 8 block, now 2 x 2 when both axes are
accelerated. After the fixes, retrospective (the R = 2 x 2 lines cut from the fully
sampled simulation, same labels) / prospective, grappa and sense:

=====================================  ===============  ===============
case                                   grappa           sense
=====================================  ===============  ===============
gre3d, 32 isochromats, 20 dummies      0.137 / 0.270    0.207 / 0.328
gre3d, 128 isochromats, 20 dummies     0.029 / 0.053    0.075 / 0.094
gre3d, 256 isochromats, 20 dummies     0.024 / 0.047    0.070 / 0.088
gre3d, 128 isochromats, 200 dummies    0.025 / 0.028    0.074 / 0.075
mprage, 32 isochromats                 0.072 / 0.104    0.086 / 0.119
=====================================  ===============  ===============

The gap between prospective and retrospective is the data: the gre3d R = 2 x 2 lines
differ from the same lines of the fully sampled run by 43 % (RMS over the sampled
lines) at 32 isochromats, 7.5 % at 128, 5.9 % at 256, and 3.7 % at 128 with 200
dummies: with 20 dummies at TR 10 ms, 12 deg (approach time ~30 TR) the first
partitions are still in the transient, and the partition-outer order makes that a kz
modulation that differs between the two scans (mprage: 17 % at 32, its trains also
differ in length and timing).

The SENSE error left (0.074 retrospective at 128 isochromats, same 24 x 8 ESPIRiT maps
for both recons) is the geometry, not the recon nor the simulator: the slab is the z
FOV (120 mm, 12 partitions) and the brain (z -92 ... 68 mm) fills it, so the excited
signal ends at the periodic z boundary and its slab-edge ringing carries the edge's
coil weights into every partition. Noise-free synthetic k-space (PD x the simulator's
sensitivities, no Bloch, exact DFT), retrospective SENSE: slab = FOV 0.064 (the
simulator's 0.074); true sensitivities instead of ESPIRiT 0.050; sensitivities varying
within the 8 mm voxels (4 x 4 x 4 sub-points) 0.064 (the voxel-constant sensitivity is
not it); z aliasing a small part (whole phantom excited, folded: 0.071; signal cut
to the slab: 0.064); CG iterations (100), lamda or the 0.95 crop not it. Slab 100 mm
in the 120 mm FOV (smooth edge) 0.028 (true maps 0.019);
slab = FOV = 240 mm, 24 partitions (object inside) 0.019 (true maps 0.008). Simulated
(64 isochromats, 150 dummies, 1 ms / TBW 4 pulse, FOV z 240, 24 partitions): retro
grappa 0.032, sense 0.032 (same maps); prospective grappa 0.047, sense 0.060, where the
fully sampled reference SENSE calibrates on 24 x 24 x 24 lines, not 24 x 8 (its maps
differ). Still not collected: cost (two simulations ~5.5 CPU-min, the reference ESPIRiT
on 24 x 24 x 24 ~9 CPU-min) and margin.

What makes them pass (collected): that geometry (slab = z FOV = 240 mm, 24 partitions,
the head inside) and ideal spoiling (``spoiling="ideal"``: the transverse magnetisation
zeroed before every excitation and inversion), which removes the unresolved RF-spoiling
pathways that made the two scans' lines differ, so 8 isochromats suffice. gre3d (150
dummies, 1 ms / TBW 4 pulse) grappa 0.0069, sense 0.020; mprage grappa 0.024, sense
0.029 (SENSE against the FFT recon inside the SENSE support, which holds 95-96 % of the
reference signal; the fully sampled scan's own SENSE would calibrate on 24^3 lines).
Simulations ~80 s per case under load.

Measured NRMSE (grappa vs fft / sense vs sense), see each case's docstring.
"""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from conftest import EXAMPLES
from metrics import nrmse
from seqtools import simulate_protocol

SITE = "siemens-prisma-3t"  # 32 receive channels


def _site(shimmed: bool):
    from mrharmony.simulation import load_site
    from mrharmony.simulation.site import site_from_mapping

    if not shimmed:
        return SITE
    data = load_site(SITE).to_mapping()
    data["b0"] = {**data["b0"], "residual_ppm": 0.0}
    return site_from_mapping(data, source=f"{SITE} (shimmed)")


def _phantom(three_d: bool):
    from mrharmony.phantoms.brain import make_brain_phantom
    from mrharmony.study.tasks import at_isocentre

    # the excited slice / slab is at isocentre: the phantom's centre must be there too
    return at_isocentre(make_brain_phantom(3.0, voxel_size_mm=8.0 if three_d else 5.0,
                                           three_d=three_d, slice_z_mm=10.0))


#: builder -> (protocol changes, acceleration keys, isochromats, shimmed site[, spoiling])
CASES = {
    # the slab (= z FOV, 240 mm, 24 partitions) holds the whole head; ideal spoiling, see
    # the module docstring
    "gre3d": ({"matrix": [32, 32, 24], "fov_mm": [220, 220, 240], "dummy_scans": 150,
               "rf_duration_ms": 1, "rf_time_bw_product": 4},
              {"acceleration": 2, "acceleration_partition": 2, "acs_lines": 24,
               "acs_lines_partition": 8}, 8, False, "ideal"),
    "mprage": ({"matrix": [32, 32, 24], "fov_mm": [220, 220, 240], "dummy_scans": 1},
               {"acceleration": 2, "acceleration_partition": 2, "acs_lines": 24,
                "acs_lines_partition": 8}, 8, False, "ideal"),
    # 256 isochromats: CPMG train with z crushers, see the module docstring
    "tse": ({"matrix": [32, 32], "n_slices": 1, "dummy_scans": 1, "turbo_factor": 8,
             "te_ms": 60},
            {"acceleration": 2, "acs_lines": 24}, 256, False),
    "epi": ({"matrix": [32, 32], "n_slices": 1, "dummy_scans": 3, "tr_ms": 3000},
            {"acceleration": 2, "acs_lines": 24}, 8, True),
    # 128 isochromats: spin echo with z crushers, see the module docstring
    "dwi_epi": ({"matrix": [32, 32], "n_slices": 1, "dummy_scans": 3,
                 "b_values_s_per_mm2": [0, 1000], "n_directions": 1},
                {"acceleration": 2, "acs_lines": 24}, 128, True),
}


def _simulate(builder: str, tmp, *, shimmed: bool | None = None):
    """Fully sampled and accelerated raw files of one case (noise off, same phantom)."""
    from mrharmony.sequences.protocol import protocol_from_mapping

    changes, accel, iso, shim, *spoiling = CASES[builder]
    shim = shim if shimmed is None else shimmed
    base = {**tomllib.loads((EXAMPLES / f"{builder}.toml").read_text()), **changes}
    ph = _phantom(builder in ("gre3d", "mprage"))
    site = _site(shim)
    return {name: simulate_protocol(protocol_from_mapping({**base, **extra}), ph, site,
                                    tmp / f"{builder}-{name}.h5", seed=3,
                                    isochromats_per_voxel=iso, noise=False,
                                    spoiling=(spoiling or ["none"])[0])
            for name, extra in (("full", {}), ("r2", accel))}


def _recon(path, method: str) -> tuple[np.ndarray, list[dict]]:
    from mrharmony.formats.raw import load_raw
    from mrharmony.recon.pipeline import reconstruct

    images = reconstruct(load_raw(path), method=method, backend="numpy")
    return (np.stack([np.abs(np.squeeze(im.data)) for im in images]),
            [im.meta["recon"] for im in images])


def _errors(files, three_d: bool = False) -> dict[str, float]:
    """NRMSE of GRAPPA against the FFT recon and of SENSE against the SENSE recon of the
    fully sampled data (the same ESPIRiT mask). 3-D: SENSE against the FFT (RSS) recon
    inside the SENSE image's support (ESPIRiT maps are normalised so that SENSE's
    magnitude is the RSS one): the fully sampled data would calibrate ESPIRiT on 24^3
    lines instead of the 24 x 8 of the accelerated scan, other maps and ~9 CPU-min."""
    out = {}
    for method, ref_method in (("grappa", "fft"), ("sense", "fft" if three_d else "sense")):
        ref, _ = _recon(files["full"], ref_method)
        img, settings = _recon(files["r2"], method)
        assert img.shape == ref.shape
        assert all(s["method"] == method and max(s["acceleration"]) == 2 for s in settings)
        if method == "sense" and three_d:
            support = img > 0  # holds 95-96 % of the reference's signal (measured)
            assert ref[support].sum() > 0.9 * ref.sum()
            img, ref = img[support], ref[support]
        out[method] = nrmse(img, ref)
    return out


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    cache: dict[str, dict[str, float]] = {}

    def get(builder: str) -> dict[str, float]:
        if builder not in cache:
            cache[builder] = _errors(_simulate(builder, tmp_path_factory.mktemp(builder)),
                                     three_d=builder in ("gre3d", "mprage"))
        return cache[builder]
    return get


@pytest.mark.parametrize("method", ["grappa", "sense"])
@pytest.mark.parametrize("builder", [
    "epi",
    "dwi_epi",
    "tse",
    "gre3d",
    "mprage",
])
def test_r2_round_trip_matches_the_fully_sampled_recon(errors, builder, method):
    """Measured (grappa / sense): epi 0.0042 / 0.0093 (~8 s); dwi_epi 0.010 / 0.014
    (b = 0: 0.007 / 0.011, b = 1000: 0.023 / 0.024; ~25 s); tse 0.023 / 0.023 (256
    isochromats; ~20 s); gre3d 0.0069 / 0.020 and mprage 0.024 / 0.029 (2 x 2, ideal
    spoiling, 8 isochromats; ~80 s each under load)."""
    assert errors(builder)[method] < 0.05


@pytest.mark.xfail(strict=True, reason="B0 residual: R = 2 EPI has half the distortion of "
                   "R = 1 (physics, not recon); measured 0.07 for grappa and sense")
def test_epi_round_trip_at_the_unshimmed_site(tmp_path):
    errs = _errors(_simulate("epi", tmp_path, shimmed=False))
    assert max(errs.values()) < 0.05
