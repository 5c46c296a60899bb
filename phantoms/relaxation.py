"""Field-dependent relaxation and diffusion values of brain tissues, with sources.

Values are tabulated at 0.55, 1.5, 3.0 and 7.0 T for grey matter (GM), white matter
(WM) and cerebrospinal fluid (CSF), at body temperature. Between tabulated fields the
relaxation times are interpolated linearly in ``log(T)`` versus ``log(B0)`` (a local
power law ``T ~ B0**k``, the form used for T1 by Bottomley 1984 and Rooney 2007);
fields outside [0.55, 7] T are refused.

The in-vivo literature spreads widely (brain WM T1 at 3 T spans 0.6 to 1.1 s between
methods, Asslaender 2024, because of magnetization transfer), so each tabulated value is
chosen *inside* the range spanned by the cited measurements at that field; the ranges
at 3 T are kept in :data:`CITED_RANGES_3T` and checked by the tests.

References
----------
.. [Stanisz2005] Stanisz GJ et al. T1, T2 relaxation and magnetization transfer in tissue
   at 3T. Magn Reson Med 2005;54:507-512. (1.5 T and 3 T: WM T1 884/1084 ms, T2 72/69 ms;
   GM T1 1124/1820 ms, T2 95/99 ms.)
.. [Wansapura1999] Wansapura JP et al. NMR relaxation times in the human brain at 3.0
   tesla. J Magn Reson Imaging 1999;9:531-538. (3 T: WM T1 832 ms, T2 80 ms; GM T1 1331
   ms, T2 110 ms.)
.. [Rooney2007] Rooney WD et al. Magnetic field and tissue dependencies of human brain
   longitudinal 1H2O relaxation in vivo. Magn Reson Med 2007;57:308-318. (T1 power law in
   B0 for 0.2-7 T; CSF T1 ~4.3 s, nearly field independent.)
.. [Peters2007] Peters AM et al. T2* measurements in human brain at 1.5, 3 and 7 T.
   Magn Reson Imaging 2007;25:748-753. (GM T2* 84.0/66.0/33.2 ms, WM 66.2/53.2/26.8 ms.)
.. [CampbellWashburn2019] Campbell-Washburn AE et al. Opportunities in interventional
   and diagnostic imaging by using high-performance low-field-strength MRI. Radiology
   2019;293:384-393. (0.55 T tissue T1/T2.)
.. [Wang2020] Wang Y, van Gelderen P, de Zwart JA, Duyn JH. B0-field dependence of MRI
   T1 relaxation in human brain. NeuroImage 2020;213:116700. (Same sequence at 0.55, 1.5,
   3 and 7 T.)
.. [Marques2010] Marques JP et al. MP2RAGE, a self bias-field corrected sequence for
   improved segmentation and T1-mapping at high field. NeuroImage 2010;49:1271-1281.
   (7 T: WM T1 ~1.15 s, GM T1 ~1.9 s.)
.. [Whittall1997] Whittall KP et al. In vivo measurement of T2 distributions and water
   contents in normal human brain. Magn Reson Med 1997;37:34-43. (Water content: WM ~0.69,
   cortical GM ~0.80 relative to water.)
.. [Holz2000] Holz M, Heil SR, Sacco A. Temperature-dependent self-diffusion coefficients
   of water. Phys Chem Chem Phys 2000;2:4740-4742. (Free water 3.0e-3 mm2/s at 37 C.)
.. [Helenius2002] Helenius J et al. Diffusion-weighted MR imaging in normal human brains
   in various age groups. AJNR Am J Neuroradiol 2002;23:194-199. (Mean diffusivity GM
   ~0.8e-3, WM ~0.7e-3 mm2/s.)

The CSF T2* values (susceptibility-limited) are model assumptions without a single
source; they only need to satisfy ``T2* <= T2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from mrharmony.errors import PhantomError

__all__ = [
    "CITED_RANGES_3T",
    "FAT_CHEMICAL_SHIFT_PPM",
    "TABULATED_FIELDS_T",
    "TISSUES",
    "TissueValues",
    "fat_values",
    "tissue_values",
]

#: Fields (T) at which :data:`_TABLE` holds values.
TABULATED_FIELDS_T: tuple[float, ...] = (0.55, 1.5, 3.0, 7.0)
#: Tissue names, in label order (label = index + 1).
TISSUES: tuple[str, ...] = ("csf", "gm", "wm")


@dataclass(frozen=True)
class TissueValues:
    """MR properties of one tissue at one field strength.

    Attributes
    ----------
    t1_ms, t2_ms, t2star_ms : float
        Relaxation times (ms), ``T2* <= T2 <= T1``.
    pd : float
        Proton density relative to water, in [0, 1].
    adc_mm2_s : float
        Mean diffusivity (mm^2/s) at 37 C.
    """

    t1_ms: float
    t2_ms: float
    t2star_ms: float
    pd: float
    adc_mm2_s: float

    def scaled(self, *, t1: float = 1.0, t2: float = 1.0) -> TissueValues:
        """Copy with T1 and T2 scaled (age or disease effects).

        Parameters
        ----------
        t1, t2 : float
            Multiplicative factors for T1 and for T2 and T2* (T2* is scaled with T2 so
            that ``T2* <= T2`` still holds); T2 and T2* are capped at T1.

        Returns
        -------
        TissueValues
        """
        t1_ms = self.t1_ms * t1
        t2_ms = min(self.t2_ms * t2, t1_ms)
        t2star_ms = min(self.t2star_ms * t2, t2_ms)
        return replace(self, t1_ms=t1_ms, t2_ms=t2_ms, t2star_ms=t2star_ms)


# T1, T2, T2* in ms per field; PD and ADC are field independent.
_T1_MS = {
    "gm": (780.0, 1100.0, 1450.0, 1900.0),    # Wang2020, Stanisz2005, Wansapura/Stanisz, Marques
    "wm": (500.0, 700.0, 900.0, 1150.0),      # Wang2020, Stanisz2005, Wansapura/Stanisz, Marques
    "csf": (4300.0, 4300.0, 4300.0, 4300.0),  # Rooney2007 (field independent)
}
_T2_MS = {
    "gm": (110.0, 100.0, 99.0, 55.0),         # CampbellWashburn2019, Stanisz2005 (1.5/3 T)
    "wm": (90.0, 72.0, 69.0, 46.0),           # CampbellWashburn2019, Stanisz2005 (1.5/3 T)
    "csf": (2000.0, 2000.0, 1800.0, 1000.0),
}
_T2STAR_MS = {
    "gm": (95.0, 84.0, 66.0, 33.2),           # Peters2007 (1.5, 3, 7 T)
    "wm": (80.0, 66.2, 53.2, 26.8),           # Peters2007 (1.5, 3, 7 T)
    "csf": (1000.0, 600.0, 400.0, 200.0),     # assumption (see module docstring)
}
_PD = {"gm": 0.80, "wm": 0.69, "csf": 1.00}                  # Whittall1997
_ADC_MM2_S = {"gm": 0.80e-3, "wm": 0.70e-3, "csf": 3.0e-3}   # Helenius2002, Holz2000

#: Literature ranges of T1 at 3 T (ms) that the tabulated values must lie within.
CITED_RANGES_3T: dict[str, dict[str, tuple[float, float]]] = {
    "t1_ms": {
        "gm": (1331.0, 1820.0),   # Wansapura1999 .. Stanisz2005
        "wm": (832.0, 1084.0),    # Wansapura1999 .. Stanisz2005
        "csf": (3700.0, 4700.0),  # Rooney2007 (4.3 s +- ~10 %)
    },
    "t2_ms": {
        "gm": (99.0, 110.0),      # Stanisz2005 .. Wansapura1999
        "wm": (69.0, 80.0),       # Stanisz2005 .. Wansapura1999
    },
}


def _interp_log(values: tuple[float, ...], field_t: float) -> float:
    logb = np.log(np.asarray(TABULATED_FIELDS_T))
    logv = np.log(np.asarray(values))
    return float(np.exp(np.interp(math.log(field_t), logb, logv)))


def tissue_values(tissue: str, field_t: float) -> TissueValues:
    """Relaxation times, PD and ADC of a brain tissue at a field strength.

    Parameters
    ----------
    tissue : {"gm", "wm", "csf"}
        Tissue name.
    field_t : float
        Main field (T), within [0.55, 7.0]. Tabulated fields return the table values
        exactly; others are interpolated log-log between neighbouring fields.

    Returns
    -------
    TissueValues

    Raises
    ------
    PhantomError
        Unknown tissue or a field outside the tabulated range.

    Examples
    --------
    >>> tissue_values("wm", 3.0).t1_ms
    900.0
    """
    if tissue not in _T1_MS:
        raise PhantomError(f"tissue {tissue!r} unknown (known: {', '.join(TISSUES)})")
    lo, hi = TABULATED_FIELDS_T[0], TABULATED_FIELDS_T[-1]
    if not (math.isfinite(field_t) and lo - 1e-9 <= field_t <= hi + 1e-9):
        raise PhantomError(f"field_t: {field_t} T outside the tabulated brain range "
                           f"[{lo}, {hi}] T")
    for i, b in enumerate(TABULATED_FIELDS_T):
        if abs(field_t - b) < 1e-9:
            t1, t2, t2s = _T1_MS[tissue][i], _T2_MS[tissue][i], _T2STAR_MS[tissue][i]
            break
    else:
        t1 = _interp_log(_T1_MS[tissue], field_t)
        t2 = min(_interp_log(_T2_MS[tissue], field_t), t1)
        t2s = min(_interp_log(_T2STAR_MS[tissue], field_t), t2)
    return TissueValues(t1_ms=t1, t2_ms=t2, t2star_ms=t2s, pd=_PD[tissue],
                        adc_mm2_s=_ADC_MM2_S[tissue])


#: Chemical shift of the main (methylene) fat peak relative to water, ppm (single-peak
#: fat model: the other peaks, ~30 % of the fat signal, are not modelled).
FAT_CHEMICAL_SHIFT_PPM = -3.4

# Subcutaneous fat, T1 / T2 in ms at 0.55, 1.5, 3 and 7 T.
# 1.5 and 3 T: Gold GE et al. Musculoskeletal MRI at 3.0 T: relaxation times and image
# contrast. AJR Am J Roentgenol 2004;183:343-351 (subcutaneous fat T1 343/382 ms,
# T2 58/68 ms). 7 T: Jordan CD et al. Musculoskeletal MRI at 3.0 T and 7.0 T: a comparison
# of relaxation times and image contrast. Eur J Radiol 2013;82:734-739 (subcutaneous fat
# T1 ~580 ms, T2 ~46 ms; rounded). 0.55 T: an assumption, the 1.5 -> 3 T T1 power law
# (T1 ~ B0^0.155) extrapolated and the 1.5 T T2 kept. T2* (all fields): a model
# assumption (no single source), shorter than T2, so T2* <= T2 holds. PD 0.9 relative
# to water (fat's proton density is ~0.9 of water's); ADC: lipids diffuse ~100x slower
# than water (1e-5 mm2/s order), an assumption.
_FAT_T1_MS = (294.0, 343.0, 382.0, 580.0)
_FAT_T2_MS = (58.0, 58.0, 68.0, 46.0)
_FAT_T2STAR_MS = (45.0, 40.0, 35.0, 20.0)
_FAT_PD = 0.9
_FAT_ADC_MM2_S = 0.02e-3


def fat_values(field_t: float) -> TissueValues:
    """Relaxation times, PD and ADC of subcutaneous fat at a field strength.

    Parameters
    ----------
    field_t : float
        Main field (T), within [0.55, 7.0]; interpolated log-log between the tabulated
        fields (0.55, 1.5, 3, 7 T; sources in the module source).

    Returns
    -------
    TissueValues
        Fat's chemical shift is :data:`FAT_CHEMICAL_SHIFT_PPM`.

    Raises
    ------
    PhantomError
        A field outside the tabulated range.
    """
    lo, hi = TABULATED_FIELDS_T[0], TABULATED_FIELDS_T[-1]
    if not (math.isfinite(field_t) and lo - 1e-9 <= field_t <= hi + 1e-9):
        raise PhantomError(f"field_t: {field_t} T outside the tabulated fat range "
                           f"[{lo}, {hi}] T")
    t1 = _interp_log(_FAT_T1_MS, field_t)
    t2 = min(_interp_log(_FAT_T2_MS, field_t), t1)
    t2s = min(_interp_log(_FAT_T2STAR_MS, field_t), t2)
    return TissueValues(t1_ms=t1, t2_ms=t2, t2star_ms=t2s, pd=_FAT_PD,
                        adc_mm2_s=_FAT_ADC_MM2_S)
