"""The installed package stays as pip wrote it: compiled numba kernels are cached in a user
cache folder, never beside the sources (a reinstall would leave them behind and turn
``mrharmony`` into a namespace package)."""

from __future__ import annotations

from pathlib import Path

import numba


def test_numba_kernels_cache_outside_the_package(monkeypatch, tmp_path):
    from mrharmony.simulation import kernels

    package = Path(kernels.__file__).resolve().parent
    for name in ("rf_affine_numba", "run_ops_numba"):
        cache = getattr(kernels, name)._cache
        where = Path(cache._cache_path).resolve()
        assert package not in where.parents, f"{name} caches in {where}"
    # numba's own setting is untouched by the module
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if not numba.config.CACHE_DIR:
        assert Path(kernels._cache_dir()) == tmp_path / "mrharmony" / "numba"


def test_a_user_numba_cache_dir_is_respected(monkeypatch):
    from mrharmony.simulation import kernels

    monkeypatch.setattr(numba.config, "CACHE_DIR", "/somewhere/else")
    assert kernels._cache_dir() == "/somewhere/else"
