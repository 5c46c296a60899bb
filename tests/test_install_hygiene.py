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


def test_every_source_package_is_installed():
    """``pip install .`` installs exactly the packages pyproject.toml lists (an explicit
    list, because the subpackages live at the repository root): every folder with an
    ``__init__.py`` under a mapped package must be listed, or a non-editable install
    lacks it (as ``mrharmony.harmonize.evaluate`` once did, which only a clean install
    showed)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():  # tests run against an installed copy without sources
        import pytest

        pytest.skip("no pyproject.toml beside the tests")
    config = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for name, folder in config["package-dir"].items():
        base = root / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((name, *rel)))
    missing = sorted(found - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}"
    assert not sorted(listed - found), "packages listed without a folder"
