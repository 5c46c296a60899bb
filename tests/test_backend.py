"""The array-module helper: NumPy always, CuPy only when present, never at import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mrharmony.backend import cupy_available, get_array_module, get_xp, resolve_device, to_numpy
from mrharmony.errors import ConfigError


def test_numpy_arrays_use_numpy():
    x = np.arange(4.0)
    assert get_array_module(x) is np
    assert get_xp("cpu") is np
    assert to_numpy(x) is x or np.array_equal(to_numpy(x), x)


def test_device_names():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if cupy_available() else "cpu")
    with pytest.raises(ConfigError, match="expected 'auto', 'cpu'"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="expected 'cuda:N'"):
        resolve_device("cuda:x")


@pytest.mark.skipif(cupy_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="CuPy with a CUDA device is not available"):
        resolve_device("cuda")


def test_import_does_not_import_cupy_or_subpackages():
    code = (
        "import sys, mrharmony, mrharmony.cli;"
        "print('cupy' in sys.modules, 'pypulseq' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA device")
def test_cupy_round_trip():
    import cupy

    x = np.arange(8.0)
    from mrharmony.backend import to_device

    y = to_device(x, "cuda")
    assert get_array_module(y) is cupy
    np.testing.assert_array_equal(to_numpy(y * 2), x * 2)
