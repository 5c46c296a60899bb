"""Sequence builders: one function per sequence, ``build_x(protocol, scanner) -> Sequence``.

Builders hold no global state: each makes its own ``pypulseq.Sequence`` bound to the
scanner's :meth:`~mrharmony.sequences.scanner.ScannerProfile.to_opts` limits. Modules
are imported on first use, so listing builders stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from mrharmony.errors import ConfigError

__all__ = ["BUILDERS", "BUILDER_SUMMARIES", "get_builder"]

#: builder name -> "module:function" inside this package.
BUILDERS: dict[str, str] = {
    "gre2d": "gre:build_gre2d",
    "gre3d": "gre:build_gre3d",
    "mese": "spin_echo:build_mese",
    "irse": "spin_echo:build_irse",
    "tse": "spin_echo:build_tse",
    "mprage": "mprage:build_mprage",
    "epi": "epi:build_epi",
    "dwi_epi": "diffusion:build_dwi_epi",
    "bssfp": "bssfp:build_bssfp",
    "radial": "noncartesian:build_radial",
    "spiral": "noncartesian:build_spiral",
}

BUILDER_SUMMARIES: dict[str, str] = {
    "gre2d": "2D multi-slice RF-spoiled gradient echo",
    "gre3d": "3D slab-selective RF-spoiled gradient echo",
    "mese": "multi-echo spin echo (CPMG), T2 mapping",
    "irse": "inversion-recovery spin echo with a list of TIs, T1 mapping",
    "tse": "2D turbo spin echo (T2-weighted)",
    "mprage": "3D MPRAGE (T1-weighted)",
    "epi": "single-shot 2D gradient-echo EPI",
    "dwi_epi": "diffusion-weighted single-shot spin-echo EPI (PGSE)",
    "bssfp": "2D balanced SSFP",
    "radial": "2D radial spoiled GRE",
    "spiral": "2D spiral-out spoiled GRE",
}


def get_builder(name: str) -> Callable[..., Any]:
    """Return the builder function registered under ``name``.

    Raises
    ------
    ConfigError
        If no builder has that name.
    """
    try:
        target = BUILDERS[name]
    except KeyError:
        raise ConfigError(
            f"builder: unknown builder {name!r} (one of {', '.join(BUILDERS)})"
        ) from None
    module_name, func_name = target.split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, func_name)
