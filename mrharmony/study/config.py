"""Study definitions: one TOML file, validated into frozen dataclasses before any work.

A study file has these tables (keys carry their units; every table is checked with
:func:`mrharmony.config.from_mapping`, so unknown keys and wrong units are named)::

    [study]                     name, seed, description, repeats
    [phantom]                   the object scanned by every site (or [cohort])
    [cohort]                    a virtual traveling-subject cohort
    [[protocols]]               name, file (protocol TOML, relative to the study file), maps
    [sites]                     names = [...] presets or TOML paths, arms = ["shared", "native"]
    [simulation]                isochromats_per_voxel, backend
    [recon]                     method, backend
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
    "CohortSection",
    "EvaluateSection",
    "FeaturesSection",
    "HarmonizeSection",
    "PhantomSection",
    "ProtocolEntry",
    "ReconSection",
    "SimulationSection",
    "SitesSection",
    "Study",
    "StudySection",
    "load_study",
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


@dataclass(frozen=True, kw_only=True)
class ReconSection:
    """Reconstruction settings."""

    method: Literal["auto", "fft", "grappa", "sense", "cs", "nufft"] = param(
        "auto", doc="reconstruction method"
    )
    backend: Literal["numpy", "cupy", "bart", "auto"] = param("numpy", doc="recon backend")


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
    for arm in kwargs["sites"].arms:
        if arm not in ("shared", "native"):
            raise StudyError(f"{source} [sites] arms: unknown arm {arm!r} (shared, native)")
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
