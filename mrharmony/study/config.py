"""Study definitions: one TOML file, validated into frozen dataclasses before any work.

A study file has these tables (keys carry their units; every table is checked with
:func:`mrharmony.config.from_mapping`, so unknown keys and wrong units are named)::

    [study]                     name, seed, description, repeats
    [phantom]                   the object scanned by every site (or [cohort])
    [cohort]                    a virtual traveling-subject cohort
    [[cohorts]]                 per-site cohorts (site or sites, n_subjects, ages, sex
                                ratio, patient_fraction, effects; ``null = true``)
    [[protocols]]               name, file (protocol TOML, relative to the study file), maps
    [sites]                     names = [...] presets or TOML paths, arms = ["shared", "native"]
    [simulation]                isochromats_per_voxel, backend, fast_path_tol_pct, spoiling
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
    "COHORT_AGE_RANGE_YEARS",
    "RECON_ARM_ACQUISITIONS",
    "VENDOR_RECON_PRESETS",
    "CohortDesign",
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


#: Ages the cohort model generates (:func:`mrharmony.phantoms.make_cohort`).
COHORT_AGE_RANGE_YEARS = (0.0, 110.0)
#: Effect keys of :class:`~mrharmony.phantoms.cohort.CohortEffects` a design entry may set.
DESIGN_EFFECT_KEYS = ("gm_slope_ml_per_year", "t1_drift_pct_per_year",
                      "t2_drift_pct_per_year", "diagnosis_region_gm_loss_pct",
                      "diagnosis_t1_pct", "diagnosis_t2_pct")
#: Most subjects one ``[[cohorts]]`` entry may hold.
MAX_SUBJECTS_PER_ENTRY = 1000


@dataclass(frozen=True, kw_only=True)
class CohortDesign:
    """One ``[[cohorts]]`` entry: subjects drawn for, and scanned only at, its site(s).

    Ages are uniform in ``[age_min_years, age_max_years]``, or normal
    (``age_mean_years``, ``age_sd_years``) truncated to that range. Effects not set here
    are the cohort model's defaults (:class:`~mrharmony.phantoms.cohort.CohortEffects`);
    ``null = true`` sets every age and diagnosis effect to zero. The entry's subjects are
    generated from the study seed and the entry (or from ``seed`` when given).
    """

    site: str = param("", doc="the site that scans these subjects (or `sites`)")
    sites: tuple[str, ...] = param((), doc="several sites that each scan these subjects")
    n_subjects: int = param(doc="number of subjects of this entry", ge=1)
    seed: int = param(-1, doc="cohort seed (-1: derived from the study seed and the entry)",
                      ge=-1)
    age_min_years: float = param(20.0, doc="youngest age", unit="years")
    age_max_years: float = param(80.0, doc="oldest age", unit="years")
    age_mean_years: float = param(-1.0, doc="mean of normal ages (-1: uniform ages)",
                                  unit="years")
    age_sd_years: float = param(0.0, doc="SD of normal ages", unit="years")
    female_fraction: float = param(0.5, doc="probability that a subject is female")
    patient_fraction: float = param(0.3, doc="probability of diagnosis 'patient'")
    null: bool = param(False, doc="no true effect: every age and diagnosis effect is zero")
    gm_slope_ml_per_year: float | None = param(None, doc="GM volume change per year")
    t1_drift_pct_per_year: float | None = param(None, doc="GM/WM T1 change per year (%)")
    t2_drift_pct_per_year: float | None = param(None, doc="GM/WM T2 change per year (%)")
    diagnosis_region_gm_loss_pct: float | None = param(None, doc="regional GM loss (%)")
    diagnosis_t1_pct: float | None = param(None, doc="regional T1 increase (%)")
    diagnosis_t2_pct: float | None = param(None, doc="regional T2 increase (%)")
    matrix: int = param(48, doc="in-plane matrix of the subject phantoms", ge=8, le=512)
    three_d: bool = param(True, doc="3-D subject phantoms (else one axial slice)")

    @property
    def site_names(self) -> tuple[str, ...]:
        """The sites of this entry (``site`` or ``sites``)."""
        return (self.site,) if self.site else tuple(self.sites)

    def effects(self) -> dict[str, float]:
        """The effect overrides of this entry (``patient_fraction`` included)."""
        out: dict[str, float] = {"patient_fraction": float(self.patient_fraction)}
        for key in DESIGN_EFFECT_KEYS:
            value = getattr(self, key)
            if self.null:
                value = 0.0
            if value is not None:
                out[key] = float(value)
        return out

    def age_normal(self) -> tuple[float, float] | None:
        """``(mean, sd)`` of normal ages, or None for uniform ages."""
        if self.age_mean_years < 0:
            return None
        return (float(self.age_mean_years), float(self.age_sd_years))


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

    isochromats_per_voxel: int = param(
        4, doc="isochromats per voxel (T2' spread, spoiling, slice profile)", ge=1, le=1024)
    backend: Literal["numpy", "cupy"] = param("numpy", doc="array backend of the simulator")
    fast_path_tol_pct: float = param(
        0.0, doc="try the fast path (each tissue class once) and use it where it agrees with "
                 "the full engine within this % of the peak signal on probe voxels; 0: off",
        ge=0.0, le=100.0)
    spoiling: Literal["none", "ideal"] = param(
        "none", doc="spoiling model: 'none' (spoilers and RF phases as played) or 'ideal' "
                    "(transverse magnetisation zeroed before every excitation and inversion; "
                    "spoiled sequences only, removes the vendors' spoiling differences)")


#: The recon-chain keys of a flavour (also options of :func:`mrharmony.recon.reconstruct`).
_CHAIN_KEYS = ("coil_combine", "filter", "partial_fourier_method", "intensity_normalization")
#: The acquisition arms: what the simulator runs (the shared .seq, or the vendor flavour).
RECON_ARM_ACQUISITIONS = ("shared", "native")


@dataclass(frozen=True, kw_only=True)
class _ReconChainKeys:
    """The recon-chain keys (:data:`_CHAIN_KEYS`) of ``[recon]`` and of its site and arm
    tables; an empty value is not set (the less specific table's, else the recon's
    default)."""

    coil_combine: Literal["", "rss", "adaptive", "sense"] = param(
        "", doc="coil combination: rss, adaptive (Walsh), sense")
    filter: Literal["", "none", "hamming", "hanning", "fermi"] = param(
        "", doc="k-space apodisation filter applied in recon")
    partial_fourier_method: Literal["", "zero", "pocs", "homodyne"] = param(
        "", doc="partial-Fourier completion")
    intensity_normalization: Literal["", "none", "prescan", "max"] = param(
        "", doc="none, prescan (receive-profile correction), max")


@dataclass(frozen=True, kw_only=True)
class ReconFlavour(_ReconChainKeys):
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


@dataclass(frozen=True, kw_only=True)
class ReconSection(_ReconChainKeys):
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


#: Suffix of a ``[harmonize] methods`` entry fitted without covariates.
NOCOV_SUFFIX = "-nocov"


@dataclass(frozen=True, kw_only=True)
class HarmonizeSection:
    """Feature-level harmonizers applied to the study's feature table."""

    methods: tuple[str, ...] = param(("combat",), doc="feature harmonizers of the registry "
                                     "(mrharmony.harmonize.registry): combat, covbat, gam, "
                                     "mean; a '-nocov' suffix (e.g. 'combat-nocov') fits "
                                     "that harmonizer without the covariates")
    batch: str = param("site", doc="batch column")
    covariates: tuple[str, ...] = param((), doc="covariate columns kept (e.g. age, sex)")
    arm: str = param("shared", doc="the arm whose features are harmonized")

    def method_spec(self, method: str) -> tuple[str, tuple[str, ...]]:
        """The registry name of a method and the covariates it is fitted with."""
        if method.endswith(NOCOV_SUFFIX):
            return method[: -len(NOCOV_SUFFIX)], ()
        return method, tuple(self.covariates)


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
    cohorts: tuple[CohortDesign, ...] = ()
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
            if value is None or (f.name == "cohorts" and not value):
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
    unknown = sorted(set(data) - set(_SECTIONS) - {"protocols", "cohorts"})
    if unknown:
        known = ", ".join([*sorted(_SECTIONS), "cohorts", "protocols"])
        raise StudyError(f"{source}: unknown table [{unknown[0]}] (tables: {known})")
    for required in ("study", "protocols", "sites"):
        if required not in data:
            raise StudyError(f"{source}: the table [{required}] is missing")
    given = [t for t in ("phantom", "cohort", "cohorts") if t in data]
    if len(given) != 1:
        raise StudyError(f"{source}: give exactly one of [phantom], [cohort] (traveling "
                         "subjects) or [[cohorts]] (per-site cohorts)"
                         + (f"; got {', '.join(given)}" if given else ""))
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
        if harmonize.method_spec(method)[0] not in usable:
            raise StudyError(f"{source} [harmonize] methods: unknown method {method!r} "
                             f"({', '.join(usable)}, each optionally with "
                             f"'{NOCOV_SUFFIX}')")
    if len(set(harmonize.methods)) != len(harmonize.methods):
        raise StudyError(f"{source} [harmonize] methods: a method is listed twice")
    if len(set(kwargs["sites"].names)) != len(kwargs["sites"].names):
        raise StudyError(f"{source} [sites] names: a site is listed twice")
    cohort = kwargs.get("cohort")
    if cohort is not None and cohort.age_max_years <= cohort.age_min_years:
        raise StudyError(f"{source} [cohort]: age_max_years must exceed age_min_years")
    if "cohorts" in data:
        kwargs["cohorts"] = _cohort_designs(data["cohorts"], kwargs["sites"].names, source)
    return Study(**kwargs, base_dir=(base_dir or Path(".")).resolve())


def _cohort_designs(entries: Any, site_names: tuple[str, ...], source: str,
                    ) -> tuple[CohortDesign, ...]:
    """Validate ``[[cohorts]]``: every problem is a StudyError naming the entry."""
    if not isinstance(entries, list) or not entries:
        raise StudyError(f"{source}: [[cohorts]] must list at least one entry")
    from mrharmony.phantoms.cohort import CohortEffects

    designs: list[CohortDesign] = []
    owner: dict[str, int] = {}
    for i, raw in enumerate(entries):
        if not isinstance(raw, dict):
            raise StudyError(f"{source}: cohorts[{i}] must be a table")
        label = raw.get("site") or raw.get("sites") or "?"
        where = (f"cohorts[{i}] (site {label!r})" if isinstance(label, str)
                 else f"cohorts[{i}] (sites {', '.join(map(str, label))})")
        try:
            d = from_mapping(CohortDesign, raw, source=where)
        except ConfigError as exc:
            raise StudyError(f"{source} {exc}") from exc

        def fail(message: str, where: str = where) -> StudyError:
            return StudyError(f"{source} {where}: {message}")

        if bool(d.site) == bool(d.sites):
            raise fail("give exactly one of site = '...' or sites = [...]")
        if d.n_subjects > MAX_SUBJECTS_PER_ENTRY:
            raise fail(f"n_subjects {d.n_subjects} is above {MAX_SUBJECTS_PER_ENTRY}, the "
                       "most one entry may hold")
        for key in ("female_fraction", "patient_fraction"):
            value = getattr(d, key)
            if value > 1:
                raise fail(f"{key} {value:g} is above 1")
            if value < 0:
                raise fail(f"{key} {value:g} is below 0")
        lo_model, hi_model = COHORT_AGE_RANGE_YEARS
        for key in ("age_min_years", "age_max_years"):
            value = getattr(d, key)
            if not lo_model <= value <= hi_model:
                raise fail(f"{key} {value:g} is outside the cohort model's ages "
                           f"[{lo_model:g}, {hi_model:g}] years")
        if d.age_max_years < d.age_min_years:
            raise fail(f"age_max_years {d.age_max_years:g} is below age_min_years "
                       f"{d.age_min_years:g}")
        normal = d.age_normal()
        if normal is None and d.age_sd_years:
            raise fail("age_sd_years needs age_mean_years")
        if normal is not None:
            if not d.age_min_years <= normal[0] <= d.age_max_years:
                raise fail(f"age_mean_years {normal[0]:g} is outside [age_min_years, "
                           f"age_max_years] = [{d.age_min_years:g}, {d.age_max_years:g}]")
            if normal[1] <= 0:
                raise fail("age_sd_years must be above 0 with age_mean_years")
        if d.null and any(getattr(d, k) not in (None, 0.0) for k in DESIGN_EFFECT_KEYS):
            raise fail("null = true sets every effect to zero; do not also set one")
        try:
            CohortEffects.from_mapping(d.effects(), source="effects")
        except ValueError as exc:
            raise fail(str(exc)) from exc
        for name in d.site_names:
            if name not in site_names:
                raise fail(f"site {name!r} is not in [sites] names "
                           f"({', '.join(site_names)})")
            if name in owner:
                raise fail(f"site {name!r} is already scanning cohorts[{owner[name]}]: "
                           "designs overlap (one entry per site; use sites = [...] for "
                           "subjects shared by several sites)")
            owner[name] = i
        if designs and (d.matrix, d.three_d) != (designs[0].matrix, designs[0].three_d):
            raise fail(f"matrix {d.matrix} / three_d {d.three_d} differ from cohorts[0]'s "
                       "(every entry images its subjects on the same grid)")
        designs.append(d)
    missing = [s for s in site_names if s not in owner]
    if missing:
        raise StudyError(f"{source} [[cohorts]]: site {missing[0]!r} has no cohort entry "
                         "(every site of [sites] scans subjects)")
    return tuple(designs)


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
