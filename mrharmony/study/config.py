"""Study definitions: one TOML file, validated into frozen dataclasses before any work.

A study file has these tables (keys carry their units; every table is checked with
:func:`mrharmony.config.from_mapping`, so unknown keys and wrong units are named)::

    [study]                     name, seed, description, repeats
    [phantom]                   the object scanned by every site (or [cohort])
    [cohort]                    a virtual traveling-subject cohort
    [[protocols]]               name, file (protocol TOML, relative to the study file), maps
    [sites]                     names = [...] presets or TOML paths, arms = ["shared", "native"]
    [simulation]                isochromats_per_voxel, backend
    [recon]                     method, backend, preset, coil_combine, filter,
                                partial_fourier_method, intensity_normalization
    [recon.sites.NAME]          the same keys for one site (overrides [recon])
    [recon.arms.NAME]           the same keys for one arm (overrides the site's); an arm
                                that is not "shared" or "native" is a recon arm:
                                ``acquisition`` names whose raw data it reconstructs
    [features]                  statistics, regions, volumes
    [harmonize]                 methods, batch, covariates
    [evaluate]                  cv_folds, classifier

:func:`load_study` validates the file and :func:`preflight` checks what can only be known
by trying: every site exists, every protocol builds on every site's scanner, every
phantom file exists. All problems are raised as :class:`~mrharmony.errors.StudyError`
naming the entry (``protocols[1] 't2-mese' cannot run at site 'ge-signa-3t': ...``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mrharmony.config import from_mapping, load_toml, param, to_mapping
from mrharmony.errors import ConfigError, StudyError

__all__ = [
    "RECON_ARM_ACQUISITIONS",
    "VENDOR_RECON_PRESETS",
    "CohortSection",
    "EvaluateSection",
    "FeaturesSection",
    "HarmonizeSection",
    "PhantomSection",
    "ProtocolEntry",
    "ReconFlavour",
    "ReconSection",
    "SimulationSection",
    "SitesSection",
    "Study",
    "StudySection",
    "load_study",
    "resolve_recon",
    "study_from_mapping",
]


@dataclass(frozen=True, kw_only=True)
class StudySection:
    """Identity and global settings of a study."""

    name: str = param(doc="study name (used in the report title)")
    description: str = param("", doc="one paragraph shown at the top of the report")
    seed: int = param(0, doc="master seed; every task's seed is derived from it", ge=0)
    repeats: int = param(
        1, doc="scan repetitions per subject and site (independent noise)", ge=1, le=100
    )


@dataclass(frozen=True, kw_only=True)
class PhantomSection:
    """One numerical phantom, scanned by every site (phantom studies)."""

    kind: Literal["system", "diffusion", "brain", "shepp-logan", "directory"] = param(
        doc="phantom model, or 'directory' for a saved phantom (see `path`)"
    )
    matrix: int = param(64, doc="in-plane matrix of the phantom grid", ge=8, le=1024)
    slice: int = param(-1, doc="slice index of a 2-D phantom (-1: central)", ge=-1)
    three_d: bool = param(False, doc="build the phantom in 3-D instead of one slice")
    path: str = param("", doc="saved phantom directory (kind = 'directory'), relative path")


@dataclass(frozen=True, kw_only=True)
class CohortSection:
    """A virtual traveling-subject cohort (every subject is scanned at every site)."""

    n_subjects: int = param(doc="number of subjects", ge=2, le=10000)
    seed: int = param(1, doc="cohort seed (biology and anatomy)", ge=0)
    age_min_years: float = param(20.0, doc="youngest age", unit="years", ge=0, le=120)
    age_max_years: float = param(80.0, doc="oldest age", unit="years", ge=0, le=120)
    matrix: int = param(48, doc="in-plane matrix of the subject phantoms", ge=8, le=512)
    three_d: bool = param(True, doc="3-D subject phantoms (else one axial slice)")


@dataclass(frozen=True, kw_only=True)
class ProtocolEntry:
    """One protocol of the study and what is derived from its images."""

    name: str = param(doc="protocol name used in file names (acq-<name>)")
    file: str = param(doc="protocol TOML, relative to the study file")
    maps: Literal["none", "t1", "t2", "adc", "dti"] = param(
        "none", doc="quantitative map fitted from the images"
    )
    plate: Literal["", "t1", "t2"] = param(
        "", doc="system phantom only: which sphere array this protocol images"
    )


@dataclass(frozen=True, kw_only=True)
class SitesSection:
    """The virtual sites and the arms (how each site runs the protocol)."""

    names: tuple[str, ...] = param(doc="site presets (`mrharmony site list`) or TOML paths",
                                   min_length=2)
    arms: tuple[str, ...] = param(
        ("shared",), doc="'shared' (the vendor-agnostic .seq) and/or 'native' (vendor flavour)",
        min_length=1,
    )


@dataclass(frozen=True, kw_only=True)
class SimulationSection:
    """Bloch simulation settings."""

    isochromats_per_voxel: int = param(4, doc="isochromats per voxel (T2' spread)", ge=1, le=64)
    backend: Literal["numpy", "cupy"] = param("numpy", doc="array backend of the simulator")


#: The recon-chain keys of a flavour (also options of :func:`mrharmony.recon.reconstruct`).
_CHAIN_KEYS = ("coil_combine", "filter", "partial_fourier_method", "intensity_normalization")
#: The acquisition arms: what the simulator runs (the shared .seq, or the vendor flavour).
RECON_ARM_ACQUISITIONS = ("shared", "native")


@dataclass(frozen=True, kw_only=True)
class ReconFlavour:
    """Recon choices of one site (``[recon.sites.NAME]``) or arm (``[recon.arms.NAME]``).

    An empty value is not set here (inherited from the less specific table).
    """

    acquisition: Literal["", "shared", "native"] = param(
        "", doc="arm tables only: the acquisition arm whose raw data this arm reconstructs "
        "(required for a recon arm, i.e. an arm named neither 'shared' nor 'native')")
    preset: Literal["", "none", "vendor"] = param(
        "", doc="'vendor': the site vendor's default online recon (VENDOR_RECON_PRESETS and "
        "the site's [native] filter and prescan); 'none': the recon's defaults (rss, no "
        "filter, pocs, no normalisation); either as if its keys were written here")
    method: Literal["", "auto", "fft", "grappa", "sense", "cs", "tv", "nufft"] = param(
        "", doc="reconstruction method")
    coil_combine: Literal["", "rss", "adaptive", "sense"] = param(
        "", doc="coil combination: rss, adaptive (Walsh), sense")
    filter: Literal["", "none", "hamming", "hanning", "fermi"] = param(
        "", doc="k-space apodisation filter applied in recon")
    partial_fourier_method: Literal["", "zero", "pocs", "homodyne"] = param(
        "", doc="partial-Fourier completion")
    intensity_normalization: Literal["", "none", "prescan", "max"] = param(
        "", doc="none, prescan (receive-profile correction), max")


@dataclass(frozen=True, kw_only=True)
class ReconSection:
    """Reconstruction settings: study-wide keys, then per site and per arm.

    Resolution for one scan (:func:`resolve_recon`): the ``[recon]`` keys, then the
    site's ``[recon.sites.NAME]``, then the arm's ``[recon.arms.NAME]``; a later table's
    key wins. ``preset = "vendor"`` in a table stands for the site vendor's keys written
    in that table (keys written beside it win). Unset chain keys are the recon's defaults
    (today's: sum of squares, no filter, POCS, no normalisation).
    """

    method: Literal["auto", "fft", "grappa", "sense", "cs", "tv", "nufft"] = param(
        "auto", doc="reconstruction method"
    )
    backend: Literal["numpy", "cupy", "bart", "auto"] = param("numpy", doc="recon backend")
    preset: Literal["none", "vendor"] = param(
        "none", doc="'vendor': every site's vendor default online recon")
    coil_combine: Literal["", "rss", "adaptive", "sense"] = param(
        "", doc="coil combination: rss, adaptive (Walsh), sense")
    filter: Literal["", "none", "hamming", "hanning", "fermi"] = param(
        "", doc="k-space apodisation filter applied in recon")
    partial_fourier_method: Literal["", "zero", "pocs", "homodyne"] = param(
        "", doc="partial-Fourier completion")
    intensity_normalization: Literal["", "none", "prescan", "max"] = param(
        "", doc="none, prescan, max")
    sites: tuple[tuple[str, ReconFlavour], ...] = ()
    arms: tuple[tuple[str, ReconFlavour], ...] = ()

    def arm_table(self, arm: str) -> ReconFlavour | None:
        """The ``[recon.arms.NAME]`` table of an arm, if any."""
        return dict(self.arms).get(arm)

    def same_at_every_site(self, arm: str) -> bool:
        """Whether ``arm`` gets one recon at every site: no ``[recon.sites.NAME]`` table
        and no ``preset = "vendor"`` in ``[recon]`` or the arm's table."""
        table = self.arm_table(arm)
        return not self.sites and self.preset != "vendor" and (
            table is None or table.preset != "vendor")

    def acquisition_of(self, arm: str) -> str:
        """The acquisition arm (``shared`` or ``native``) whose raw data ``arm`` uses."""
        table = self.arm_table(arm)
        if table is not None and table.acquisition:
            return table.acquisition
        return arm


#: Each vendor's default online recon, as far as it is documented (the site's own
#: ``[native]`` table supplies the k-space filter and whether prescan normalisation is on,
#: so those two have one source). ``source`` says what each choice rests on.
VENDOR_RECON_PRESETS: dict[str, dict[str, str]] = {
    "siemens": {
        "coil_combine": "adaptive", "partial_fourier_method": "zero",
        "source": "coil_combine: 'Adaptive Combine' is the syngo coil-combine mode named in "
                  "Siemens protocols and used by default for multi-channel head arrays "
                  "(Walsh-type; guess that it is the default for every product sequence); "
                  "partial_fourier_method: zero filling is the product default, POCS an "
                  "option (guess)",
    },
    "ge": {
        "coil_combine": "rss", "partial_fourier_method": "homodyne",
        "source": "partial_fourier_method: homodyne reconstruction of fractional-NEX data "
                  "(Noll, Nishimura and Macovski 1991, widely reported as GE's method); "
                  "coil_combine: sum of squares (guess)",
    },
    "philips": {
        "coil_combine": "sense", "partial_fourier_method": "homodyne",
        "source": "coil_combine: Philips combines array images with the sensitivities of "
                  "the SENSE reference scan (CLEAR), modelled as ESPIRiT maps + Roemer; "
                  "partial_fourier_method: half-scan with phase correction, modelled as "
                  "homodyne (guess)",
    },
    "united imaging": {
        "coil_combine": "rss", "partial_fourier_method": "pocs",
        "source": "no public description: sum of squares and POCS (guess)",
    },
}


def _vendor_keys(site: Any) -> dict[str, Any]:
    """The ``preset = "vendor"`` keys of a site (a :class:`~mrharmony.simulation.site.Site`)."""
    vendor = str(site.vendor).lower()
    if vendor not in VENDOR_RECON_PRESETS:
        raise StudyError(f"[recon] preset 'vendor': no recon preset for vendor "
                         f"{site.vendor!r} of site {site.name!r} "
                         f"({', '.join(VENDOR_RECON_PRESETS)})")
    table = {k: v for k, v in VENDOR_RECON_PRESETS[vendor].items() if k != "source"}
    native = site.native
    table["filter"] = native.kspace_filter
    if native.kspace_filter == "fermi":
        table["filter_radius"] = float(native.kspace_filter_radius)
        table["filter_width"] = float(native.kspace_filter_width)
    table["intensity_normalization"] = "prescan" if native.prescan_normalize else "none"
    return table


def _layer(table: Any, site: Any) -> dict[str, Any]:
    """The keys one table sets, its preset expanded beneath them."""
    from mrharmony.recon.pipeline import RECON_CHAIN_DEFAULTS

    out: dict[str, Any] = {}
    preset = getattr(table, "preset", "")
    if preset == "vendor":
        out.update(_vendor_keys(site))
    elif preset == "none":  # the recon's own defaults, written here
        out.update({k: RECON_CHAIN_DEFAULTS[k] for k in _CHAIN_KEYS})
    for key in ("method", *_CHAIN_KEYS):
        value = getattr(table, key, "")
        if value:
            out[key] = value
            if key == "filter":  # a filter written here brings no preset's Fermi shape
                out.pop("filter_radius", None)
                out.pop("filter_width", None)
    return out


def resolve_recon(recon: ReconSection, site: Any, arm: str) -> dict[str, Any]:
    """The recon a scan gets at ``site`` in ``arm``: method, backend and chain options.

    Parameters
    ----------
    recon : ReconSection
    site : Site
        The loaded site (its ``name``, ``vendor`` and ``[native]`` table are used).
    arm : str
        The study arm.

    Returns
    -------
    dict
        ``method``, ``backend`` and the chain options that are set (``coil_combine``,
        ``filter`` (+ ``filter_radius``/``filter_width`` for a vendor Fermi filter),
        ``partial_fourier_method``, ``intensity_normalization``); unset ones are the
        recon's defaults.
    """
    merged: dict[str, Any] = {"method": recon.method}
    for table in (recon, dict(recon.sites).get(site.name), recon.arm_table(arm)):
        if table is not None:
            layer = _layer(table, site)
            if "filter" in layer and "filter_radius" not in layer:
                merged.pop("filter_radius", None)
                merged.pop("filter_width", None)
            merged.update(layer)
    merged["backend"] = recon.backend
    return merged


@dataclass(frozen=True, kw_only=True)
class FeaturesSection:
    """Which features are extracted per scan."""

    statistics: tuple[str, ...] = param(("mean",), doc="ROI statistics: mean, median")
    volumes: bool = param(False, doc="also tissue volumes (mL) from a segmentation")
    segmentation: Literal["atlas", "gmm"] = param(
        "atlas", doc="volumes from: atlas (MNI152 priors registered to the image, EM with "
        "partial-volume classes, MRF, bias field; ~1 min per image) or gmm (3-class "
        "intensity Gaussian mixture, soft counts; fast)")


@dataclass(frozen=True, kw_only=True)
class HarmonizeSection:
    """Feature-level harmonizers applied to the study's feature table."""

    methods: tuple[str, ...] = param(("combat",), doc="feature harmonizers of the registry "
                                     "(mrharmony.harmonize.registry): combat, covbat, gam, mean")
    batch: str = param("site", doc="batch column")
    covariates: tuple[str, ...] = param((), doc="covariate columns kept (e.g. age, sex)")
    arm: str = param("shared", doc="the arm whose features are harmonized")


@dataclass(frozen=True, kw_only=True)
class EvaluateSection:
    """Evaluation settings."""

    cv_folds: int = param(5, doc="cross-validation folds of the site classifier", ge=2, le=50)
    permutations: int = param(200, doc="permutations for the classifier's p-value", ge=0)


@dataclass(frozen=True, kw_only=True)
class Study:
    """A validated study definition."""

    study: StudySection
    protocols: tuple[ProtocolEntry, ...]
    sites: SitesSection
    phantom: PhantomSection | None = None
    cohort: CohortSection | None = None
    simulation: SimulationSection = field(default_factory=SimulationSection)
    recon: ReconSection = field(default_factory=ReconSection)
    features: FeaturesSection = field(default_factory=FeaturesSection)
    harmonize: HarmonizeSection = field(default_factory=HarmonizeSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    base_dir: Path = Path(".")

    def protocol_path(self, entry: ProtocolEntry) -> Path:
        """Absolute path of a protocol's TOML file."""
        path = Path(entry.file)
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def to_mapping(self) -> dict[str, Any]:
        """The study as plain data (for hashing and for the report)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "base_dir":
                continue
            if value is None:
                continue
            if isinstance(value, tuple):
                out[f.name] = [to_mapping(v) for v in value]
            elif isinstance(value, ReconSection):
                recon = {k: v for k, v in to_mapping(value).items()
                         if k not in ("sites", "arms") and v != ""}
                for group in ("sites", "arms"):
                    tables = {name: {k: v for k, v in to_mapping(t).items() if v != ""}
                              for name, t in getattr(value, group)}
                    if tables:
                        recon[group] = tables
                out[f.name] = recon
            else:
                out[f.name] = to_mapping(value)
        return out


_SECTIONS: dict[str, type] = {
    "study": StudySection,
    "phantom": PhantomSection,
    "cohort": CohortSection,
    "sites": SitesSection,
    "simulation": SimulationSection,
    "recon": ReconSection,
    "features": FeaturesSection,
    "harmonize": HarmonizeSection,
    "evaluate": EvaluateSection,
}


def study_from_mapping(data: dict[str, Any], *, source: str = "study",
                       base_dir: Path | None = None) -> Study:
    """Validate a parsed study mapping into a :class:`Study`.

    Raises
    ------
    StudyError
        Naming the table and key of the first problem.
    """
    unknown = sorted(set(data) - set(_SECTIONS) - {"protocols"})
    if unknown:
        known = ", ".join([*sorted(_SECTIONS), "protocols"])
        raise StudyError(f"{source}: unknown table [{unknown[0]}] (tables: {known})")
    for required in ("study", "protocols", "sites"):
        if required not in data:
            raise StudyError(f"{source}: the table [{required}] is missing")
    if ("phantom" in data) == ("cohort" in data):
        raise StudyError(f"{source}: give exactly one of [phantom] or [cohort]")
    kwargs: dict[str, Any] = {}
    try:
        for name, cls in _SECTIONS.items():
            if name in data:
                if not isinstance(data[name], dict):
                    raise StudyError(f"{source}: [{name}] must be a table")
                if name == "recon":
                    kwargs[name] = _recon_section(data[name], source)
                    continue
                kwargs[name] = from_mapping(cls, data[name], source=f"{source} [{name}]")
        protocols = data["protocols"]
        if not isinstance(protocols, list) or not protocols:
            raise StudyError(f"{source}: [[protocols]] must list at least one protocol")
        kwargs["protocols"] = tuple(
            from_mapping(ProtocolEntry, p, source=f"{source} protocols[{i}]")
            for i, p in enumerate(protocols)
        )
    except ConfigError as exc:
        if isinstance(exc, StudyError):
            raise
        raise StudyError(str(exc)) from exc
    names = [p.name for p in kwargs["protocols"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StudyError(f"{source}: protocol name {dupes[0]!r} is used twice")
    recon = kwargs.get("recon", ReconSection())
    arms = kwargs["sites"].arms
    if len(set(arms)) != len(arms):
        raise StudyError(f"{source} [sites] arms: an arm is listed twice")
    for arm in arms:
        table = recon.arm_table(arm)
        if arm not in RECON_ARM_ACQUISITIONS and (table is None or not table.acquisition):
            raise StudyError(
                f"{source} [sites] arms: unknown arm {arm!r} (shared, native, or a recon arm "
                f"with [recon.arms.{arm}] acquisition = 'shared' or 'native')")
    for arm, table in recon.arms:
        if arm not in arms:
            raise StudyError(f"{source} [recon.arms.{arm}]: arm {arm!r} is not in [sites] "
                             f"arms ({', '.join(arms)})")
        if arm in RECON_ARM_ACQUISITIONS and table.acquisition not in ("", arm):
            raise StudyError(f"{source} [recon.arms.{arm}] acquisition: the {arm!r} arm "
                             f"reconstructs its own raw data, not {table.acquisition!r}")
    harmonize = kwargs.get("harmonize", HarmonizeSection())
    from mrharmony.harmonize.registry import feature_harmonizers

    usable = feature_harmonizers(cross_sectional=True)
    for method in harmonize.methods:
        if method not in usable:
            raise StudyError(f"{source} [harmonize] methods: unknown method {method!r} "
                             f"({', '.join(usable)})")
    if len(set(kwargs["sites"].names)) != len(kwargs["sites"].names):
        raise StudyError(f"{source} [sites] names: a site is listed twice")
    cohort = kwargs.get("cohort")
    if cohort is not None and cohort.age_max_years <= cohort.age_min_years:
        raise StudyError(f"{source} [cohort]: age_max_years must exceed age_min_years")
    return Study(**kwargs, base_dir=(base_dir or Path(".")).resolve())


def _recon_section(data: dict[str, Any], source: str) -> ReconSection:
    """``[recon]`` with its ``[recon.sites.NAME]`` and ``[recon.arms.NAME]`` tables."""
    plain = {k: v for k, v in data.items() if k not in ("sites", "arms")}
    nested: dict[str, tuple[tuple[str, ReconFlavour], ...]] = {}
    for group in ("sites", "arms"):
        tables = data.get(group, {})
        if not isinstance(tables, dict):
            raise StudyError(f"{source} [recon.{group}]: must be a table of tables "
                             f"([recon.{group}.NAME])")
        entries = []
        for name, table in tables.items():
            where = f"{source} [recon.{group}.{name}]"
            if not isinstance(table, dict):
                raise StudyError(f"{where}: must be a table")
            flavour = from_mapping(ReconFlavour, table, source=where)
            if group == "sites" and flavour.acquisition:
                raise StudyError(f"{where} acquisition: only arm tables name an "
                                 "acquisition")
            entries.append((str(name), flavour))
        nested[group] = tuple(entries)
    return dataclasses.replace(
        from_mapping(ReconSection, plain, source=f"{source} [recon]"), **nested)


def load_study(path: str | Path) -> Study:
    """Read and validate a study TOML file (relative paths resolve against its folder).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    StudyError
        If the file is not valid TOML or a table or key is invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: study file not found")
    data = load_toml(path, error=StudyError)
    return study_from_mapping(data, source=str(path), base_dir=path.parent)
