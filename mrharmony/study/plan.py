"""From a validated study to a graph of content-addressed tasks.

:func:`preflight` resolves every named thing (sites, scanners, protocols, phantom files)
and builds every protocol on every scanner it will run on, in memory, so that a study
that cannot run fails before any work with a :class:`~mrharmony.errors.StudyError`
naming the entry. :func:`plan_tasks` then lays out the graph::

    phantom(subject, field)  ─┐
    sequence(protocol, scanner[, native flavour]) ─┤
                              └─► simulate(subject, site, acquisition arm, protocol, repeat)
                                    └─► recon(arm's flavour at the site) ─► features

A recon arm (``[recon.arms.NAME]`` with ``acquisition``) shares the sequence and simulate
tasks of its acquisition arm and adds only its own recon and features tasks.

Seeds come from the content (study seed, subject, site, arm, protocol, repeat), never
from execution order, so a run on any cluster gives the same numbers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrharmony.config import to_mapping
from mrharmony.errors import ConfigError, MrHarmonyError, StudyError
from mrharmony.study.config import ProtocolEntry, Study
from mrharmony.study.execute import TaskSpec
from mrharmony.study.store import task_key

__all__ = ["Plan", "Resolved", "Scan", "derive_seed", "design_cohort_params",
           "design_subjects", "make_design_cohort", "measurable_range_ms", "plan_tasks",
           "preflight", "protocol_mapping", "recon_params"]

_HIDDEN_PROTOCOL_KEYS = ("ndim", "cartesian")


def protocol_mapping(protocol: Any) -> dict[str, Any]:
    """A protocol as the TOML mapping that rebuilds it (builder-set keys dropped)."""
    data = to_mapping(protocol)
    for key in _HIDDEN_PROTOCOL_KEYS:
        data.pop(key, None)
    return data


def measurable_range_ms(protocol: Any, maps: str) -> list[float] | None:
    """The relaxation times a mapping protocol samples: [first, last] TI or TE, in ms.

    A T1 (T2) outside the inversion (echo) times a protocol samples is not measurable by
    it; study summaries keep such regions apart (``in_range`` column of the features).
    """
    if maps == "t1" and hasattr(protocol, "ti_ms"):
        ti = [float(t) for t in np.atleast_1d(protocol.ti_ms)]
        return [min(ti), max(ti)]
    if maps == "t2" and hasattr(protocol, "n_echoes"):
        return [float(protocol.te_ms), float(protocol.te_ms) * int(protocol.n_echoes)]
    return None


def derive_seed(*parts: Any) -> int:
    """A 32-bit seed from content (stable across machines and runs)."""
    text = "/".join(str(p) for p in parts)
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


@dataclass
class Resolved:
    """Everything a study names, loaded and checked."""

    sites: dict[str, Any]                       # site name -> Site
    site_mappings: dict[str, dict[str, Any]]    # site name -> TOML mapping (hashed)
    protocols: dict[str, Any]                   # protocol name -> Protocol
    subjects: list[dict[str, Any]]              # id + covariates
    phantom_path: Path | None = None
    #: per-site design ([[cohorts]]): subject -> the sites that scan it, and the cohort
    #: parameters of its phantom (entry's cohort, seed, the cohort's own subject id)
    subject_sites: dict[str, tuple[str, ...]] = field(default_factory=dict)
    subject_cohorts: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Scan:
    """One simulated acquisition and where its results live."""

    subject: str
    site: str
    arm: str
    protocol: str
    repeat: int
    covariates: dict[str, Any]
    simulate_key: str
    recon_key: str
    features_key: str
    phantom_key: str
    sequence_key: str


@dataclass
class Plan:
    """The task graph of a study (``specs`` in dependency order) and its scans."""

    specs: list[TaskSpec] = field(default_factory=list)
    scans: list[Scan] = field(default_factory=list)
    sequences: dict[str, dict[str, str]] = field(default_factory=dict)  # key -> info
    phantoms: dict[str, dict[str, Any]] = field(default_factory=dict)   # key -> info

    def add(self, spec: TaskSpec) -> str:
        if spec.key not in self._keys:
            self.specs.append(spec)
            self._keys.add(spec.key)
        return spec.key

    def __post_init__(self) -> None:
        self._keys: set[str] = set()


def design_cohort_params(study: Study, index: int) -> dict[str, Any]:
    """The :func:`~mrharmony.phantoms.make_cohort` arguments of ``[[cohorts]]`` entry
    ``index``: its seed (given, or derived from the study seed and the entry), size, ages,
    sex ratio and effects."""
    d = study.cohorts[index]
    seed = d.seed if d.seed >= 0 else derive_seed(study.study.seed, "cohorts", index,
                                                   *d.site_names) % (2**31)
    params: dict[str, Any] = {"n_subjects": d.n_subjects, "seed": seed,
                              "age_range": [d.age_min_years, d.age_max_years],
                              "effects": d.effects()}
    if d.age_normal() is not None:
        params["age_normal"] = list(d.age_normal())
    if d.female_fraction != 0.5:
        params["female_fraction"] = d.female_fraction
    return params


def make_design_cohort(params: dict[str, Any]) -> Any:
    """The cohort of :func:`design_cohort_params` (also used by the phantom task)."""
    from mrharmony.phantoms import make_cohort

    normal = params.get("age_normal")
    return make_cohort(int(params["n_subjects"]), int(params["seed"]),
                       age_range=tuple(params["age_range"]), effects=params.get("effects"),
                       age_normal=None if normal is None else tuple(normal),
                       female_fraction=float(params.get("female_fraction", 0.5)))


def design_subjects(study: Study) -> tuple[list[dict[str, Any]], dict[str, tuple[str, ...]],
                                           dict[str, dict[str, Any]]]:
    """Subjects of a per-site design (``[[cohorts]]``), without building any anatomy.

    Returns
    -------
    subjects : list of dict
        ``subject`` (study id ``c<entry>s<k>``, e.g. ``c1s003``), ``age`` (years), ``sex``,
        ``diagnosis``.
    sites : dict
        Subject -> the sites that scan it (its entry's).
    cohorts : dict
        Subject -> its entry's cohort parameters plus ``cohort_subject`` (``sub-003``).
    """
    subjects, sites, cohorts = [], {}, {}
    for i, d in enumerate(study.cohorts):
        params = design_cohort_params(study, i)
        table = make_design_cohort(params).covariates()
        for k, row in enumerate(table.to_dict(orient="records")):
            sid = f"c{i + 1}s{k + 1:03d}"
            subjects.append({"subject": sid, "age": row["age"], "sex": row["sex"],
                             "diagnosis": row["diagnosis"]})
            sites[sid] = d.site_names
            cohorts[sid] = {**params, "cohort_subject": row["subject"], "entry": i}
    return subjects, sites, cohorts


def _subjects(study: Study) -> list[dict[str, Any]]:
    if study.cohort is None:
        return [{"subject": "phantom"}]
    from mrharmony.phantoms import make_cohort

    c = study.cohort
    cohort = make_cohort(c.n_subjects, c.seed, age_range=(c.age_min_years, c.age_max_years))
    table = cohort.covariates()
    return [dict(row) for row in table.to_dict(orient="records")]


def preflight(study: Study) -> Resolved:
    """Resolve and check everything a study names, before any work.

    Raises
    ------
    StudyError
        Naming the entry: an unknown site, a protocol file that is missing or invalid,
        a protocol that a site's scanner cannot run (with the builder's reason), a
        missing phantom directory.
    """
    from mrharmony.sequences import build, load_protocol
    from mrharmony.sequences.protocol import check_receive_channels
    from mrharmony.simulation.native import native_protocol
    from mrharmony.simulation.site import load_site

    sites: dict[str, Any] = {}
    mappings: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(study.sites.names):
        ref = name
        if name.endswith(".toml") and not Path(name).is_absolute():
            ref = str((study.base_dir / name).resolve())
        try:
            site = load_site(ref)
        except (ConfigError, FileNotFoundError) as exc:
            raise StudyError(f"sites.names[{i}] {name!r}: {exc}") from exc
        sites[site.name] = site
        mappings[site.name] = site.to_mapping()

    protocols: dict[str, Any] = {}
    for i, entry in enumerate(study.protocols):
        path = study.protocol_path(entry)
        if not path.is_file():
            raise StudyError(f"protocols[{i}] {entry.name!r}: file {path} not found")
        try:
            protocols[entry.name] = load_protocol(path)
        except ConfigError as exc:
            raise StudyError(f"protocols[{i}] {entry.name!r}: {exc}") from exc
        if study.phantom is not None and study.phantom.kind == "system" and not entry.plate:
            raise StudyError(f"protocols[{i}] {entry.name!r}: the system phantom needs "
                             "plate = 't1' or 't2' (the sphere array this protocol images)")

    for name, _ in study.recon.sites:
        if name not in sites:
            raise StudyError(f"[recon.sites.{name}]: {name!r} is not a site of the study "
                             f"({', '.join(sites)})")
    for site in sites.values():
        for arm in study.sites.arms:
            _check_recon(study, site, arm)

    for i, entry in enumerate(study.protocols):
        for site_name, site in sites.items():
            for arm in {study.recon.acquisition_of(a): None for a in study.sites.arms}:
                protocol = protocols[entry.name]
                try:
                    if arm == "native":
                        protocol = native_protocol(protocol, site)
                    check_receive_channels(protocol, site.coil.channels)
                    build(protocol, site.profile)
                except MrHarmonyError as exc:
                    raise StudyError(
                        f"protocols[{i}] {entry.name!r} cannot run at site {site_name!r} "
                        f"(scanner {site.scanner}, arm {arm}): {exc}") from exc

    phantom_path = None
    if study.phantom is not None and study.phantom.kind == "directory":
        phantom_path = (study.base_dir / study.phantom.path).resolve()
        if not (phantom_path / "phantom.json").is_file():
            raise StudyError(f"[phantom] path: {phantom_path} is not a saved phantom "
                             "(no phantom.json)")
    subject_sites: dict[str, tuple[str, ...]] = {}
    subject_cohorts: dict[str, dict[str, Any]] = {}
    try:
        if study.cohorts:
            subjects, subject_sites, subject_cohorts = design_subjects(study)
            # [[cohorts]] name sites as written in [sites] names; plan by loaded name
            written = dict(zip(study.sites.names, sites, strict=True))
            subject_sites = {k: tuple(written[s] for s in v) for k, v in subject_sites.items()}
        else:
            subjects = _subjects(study)
    except MrHarmonyError as exc:
        raise StudyError(f"[cohort]: {exc}") from exc
    return Resolved(sites=sites, site_mappings=mappings, protocols=protocols,
                    subjects=subjects, phantom_path=phantom_path,
                    subject_sites=subject_sites, subject_cohorts=subject_cohorts)


def _check_recon(study: Study, site: Any, arm: str) -> dict[str, Any]:
    """The resolved recon of ``site`` in ``arm``; options the method cannot take are
    refused here, naming the site and the arm (``auto`` is checked by the recon)."""
    from mrharmony.recon.pipeline import METHOD_OPTIONS
    from mrharmony.study.config import resolve_recon

    try:
        recon = resolve_recon(study.recon, site, arm)
    except StudyError as exc:
        raise StudyError(f"site {site.name!r}, arm {arm!r}: {exc}") from exc
    method = recon["method"]
    if method != "auto":
        extra = sorted(k for k in recon if k not in ("method", "backend")
                       and k not in METHOD_OPTIONS[method])
        if extra:
            raise StudyError(
                f"[recon] site {site.name!r}, arm {arm!r}: method {method!r} does not take "
                f"{', '.join(extra)} (it takes: {', '.join(METHOD_OPTIONS[method])})")
    return recon


def recon_params(study: Study, site: Any, arm: str, maps: str) -> dict[str, Any]:
    """The parameters of a recon task: method, backend, maps and the chain options that
    differ from the recon's defaults (so that a study without recon flavours keeps the
    task keys, and the cache, it had)."""
    from mrharmony.recon.pipeline import RECON_CHAIN_DEFAULTS

    recon = _check_recon(study, site, arm)
    params: dict[str, Any] = {"method": recon["method"], "backend": recon["backend"],
                              "maps": maps}
    for key, default in RECON_CHAIN_DEFAULTS.items():
        if key in recon and recon[key] != default:
            params[key] = recon[key]
    if params.get("filter") != "fermi":
        params.pop("filter_radius", None)
        params.pop("filter_width", None)
    return params


def _phantom_params(study: Study, entry: ProtocolEntry, subject: dict[str, Any],
                    field_t: float, resolved: Resolved) -> dict[str, Any]:
    if study.cohorts:
        params = {k: v for k, v in resolved.subject_cohorts[subject["subject"]].items()
                  if k not in ("cohort_subject", "entry")}
        d = study.cohorts[0]
        return {"kind": "design-cohort", **params,
                "subject": resolved.subject_cohorts[subject["subject"]]["cohort_subject"],
                "matrix": d.matrix, "three_d": d.three_d, "field_t": field_t}
    if study.cohort is not None:
        c = study.cohort
        return {"kind": "cohort", "n_subjects": c.n_subjects, "seed": c.seed,
                "age_range": [c.age_min_years, c.age_max_years],
                "subject": subject["subject"], "matrix": c.matrix, "three_d": c.three_d,
                "field_t": field_t}
    p = study.phantom
    assert p is not None  # guaranteed by study_from_mapping
    params: dict[str, Any] = {"kind": p.kind, "matrix": p.matrix, "slice": p.slice,
                              "three_d": p.three_d, "field_t": field_t}
    if p.kind == "system":
        params["plate"] = entry.plate
    if p.kind == "directory":
        params["path"] = str(resolved.phantom_path)
        # the content, not the path, addresses the task
        params["sha256"] = hashlib.sha256(
            (resolved.phantom_path / "phantom.json").read_bytes()).hexdigest()
    return params


def plan_tasks(study: Study, resolved: Resolved) -> Plan:
    """Lay out the content-addressed task graph of a study (see the module docstring)."""
    from mrharmony.sequences import load_scanner
    from mrharmony.simulation.native import native_protocol

    plan = Plan()
    seed = study.study.seed
    for entry in study.protocols:
        base_protocol = resolved.protocols[entry.name]
        for site_name, site in resolved.sites.items():
            scanner = to_mapping(load_scanner(site.scanner))
            for arm in study.sites.arms:
                # a recon arm reconstructs the raw data of its acquisition arm: the same
                # sequence and simulate tasks (same keys, same seeds), another recon task
                acq = study.recon.acquisition_of(arm)
                protocol = (native_protocol(base_protocol, site) if acq == "native"
                            else base_protocol)
                seq_params = {"protocol": protocol_mapping(protocol), "scanner": scanner}
                seq_key = plan.add(TaskSpec(
                    "sequence", task_key("sequence", seq_params), seq_params,
                    label=f"seq {entry.name} {scanner['name']}"
                          + (f" native-{site_name}" if acq == "native" else "")))
                plan.sequences[seq_key] = {"protocol": entry.name, "scanner": scanner["name"],
                                           "arm": acq, "site": site_name}
                for subject in resolved.subjects:
                    sid = subject["subject"]
                    if resolved.subject_sites and site_name not in resolved.subject_sites[sid]:
                        continue  # per-site design: each site scans only its own subjects
                    ph_params = _phantom_params(study, entry, subject,
                                                site.field_strength_t, resolved)
                    ph_key = plan.add(TaskSpec(
                        "phantom", task_key("phantom", ph_params), ph_params,
                        label=f"phantom {sid} {site.field_strength_t:g}T"))
                    plan.phantoms[ph_key] = {"subject": sid, "field_t": site.field_strength_t}
                    for repeat in range(study.study.repeats):
                        sim_params = {
                            "site": resolved.site_mappings[site_name], "native": acq == "native",
                            "seed": derive_seed(seed, sid, site_name, acq, entry.name, repeat),
                            "isochromats_per_voxel": study.simulation.isochromats_per_voxel,
                            "backend": study.simulation.backend,
                        }
                        if study.simulation.fast_path_tol_pct > 0:  # off: keys as before
                            sim_params["fast_path_tol_pct"] = study.simulation.fast_path_tol_pct
                        if study.simulation.spoiling != "none":  # default: keys as before
                            sim_params["spoiling"] = study.simulation.spoiling
                        if acq == "native":
                            # the simulator applies the vendor's receive-chain processing
                            # too and records the vendor's sequence choices of the protocol
                            sim_params["protocol"] = protocol_mapping(base_protocol)
                        sim_inputs = {"sequence": seq_key, "phantom": ph_key}
                        tag = f"{sid} {site_name} {arm} {entry.name} r{repeat}"
                        sim_key = plan.add(TaskSpec(
                            "simulate", task_key("simulate", sim_params, sim_inputs),
                            sim_params, sim_inputs,
                            label=f"simulate {sid} {site_name} {acq} {entry.name} r{repeat}"))
                        rec_params = recon_params(study, site, arm, entry.maps)
                        rec_key = plan.add(TaskSpec(
                            "recon", task_key("recon", rec_params, {"raw": sim_key}),
                            rec_params, {"raw": sim_key}, label=f"recon {tag}"))
                        feat_params = {
                            "statistics": list(study.features.statistics),
                            "volumes": study.features.volumes, "maps": entry.maps,
                            "segmentation": study.features.segmentation,
                            "protocol": entry.name,
                            "range_ms": measurable_range_ms(base_protocol, entry.maps),
                            "ids": {"subject": sid, "site": site_name, "arm": arm,
                                    "repeat": repeat, "vendor": site.vendor,
                                    "field_t": site.field_strength_t},
                            "covariates": {k: v for k, v in subject.items() if k != "subject"},
                        }
                        feat_inputs = {"recon": rec_key, "phantom": ph_key}
                        feat_key = plan.add(TaskSpec(
                            "features", task_key("features", feat_params, feat_inputs),
                            feat_params, feat_inputs, label=f"features {tag}"))
                        plan.scans.append(Scan(
                            subject=sid, site=site_name, arm=arm, protocol=entry.name,
                            repeat=repeat,
                            covariates={k: v for k, v in subject.items() if k != "subject"},
                            simulate_key=sim_key, recon_key=rec_key, features_key=feat_key,
                            phantom_key=ph_key, sequence_key=seq_key))
    return plan
