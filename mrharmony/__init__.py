"""mrharmony: vendor-agnostic MRI from Pulseq sequences to harmonized multi-site statistics.

The import package bundles the design card's folders as subpackages:
``mrharmony.sequences``, ``mrharmony.phantoms``, ``mrharmony.simulation``,
``mrharmony.recon`` and ``mrharmony.harmonize``. Importing :mod:`mrharmony` is cheap:
subpackages (and optional GPU libraries) load only when used.
"""

from importlib.metadata import PackageNotFoundError, version

from mrharmony.errors import ConfigError, MrHarmonyError, ProtocolError, ScannerError

try:
    __version__ = version("mrharmony")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0.0.0+unknown"

__all__ = ["ConfigError", "MrHarmonyError", "ProtocolError", "ScannerError", "__version__"]
