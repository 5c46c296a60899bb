"""Recon flavours in studies: per-arm / per-site tables, vendor presets, recon arms that
reuse the same raw data, and the report's CoV per flavour."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrharmony.errors import StudyError
from mrharmony.study import load_study, run_study
from mrharmony.study.analysis import DERIVATIVES
from mrharmony.study.config import VENDOR_RECON_PRESETS, resolve_recon, study_from_mapping

GRE = """
builder = "gre2d"
name = "tiny-gre"
fov_mm = [240, 240]
matrix = [24, 24]
slice_thickness_mm = 8
n_slices = 1
te_ms = 4
tr_ms = 40
flip_deg = 30
partial_fourier_fraction = 0.75
"""

STUDY = """
[study]
name = "tiny-recon"
seed = 5
repeats = 1

[phantom]
kind = "system"
matrix = 24

[[protocols]]
name = "t1w"
file = "gre.toml"
plate = "t1"

[sites]
names = ["siemens-prisma-3t", "philips-ingenia-1.5t"]
arms = ["shared-recon", "native-recon"]

[simulation]
isochromats_per_voxel = 1

[recon]
method = "fft"

[recon.arms.shared-recon]
acquisition = "shared"
preset = "none"

[recon.arms.native-recon]
acquisition = "shared"
preset = "vendor"

[harmonize]
methods = []
arm = "shared-recon"
"""


def _base() -> dict:
    return {"study": {"name": "x"}, "phantom": {"kind": "system"},
            "protocols": [{"name": "a", "file": "a.toml", "plate": "t1"}],
            "sites": {"names": ["siemens-prisma-3t", "ge-premier-3t"],
                      "arms": ["shared", "vendor"]},
            "recon": {"arms": {"vendor": {"acquisition": "shared", "preset": "vendor"}}}}


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d["recon"]["arms"]["vendor"].update(filter="kaiser"),
         r"\[recon.arms.vendor\].*filter"),
        (lambda d: d["recon"]["arms"]["vendor"].update(colour="red"),
         r"\[recon.arms.vendor\].*colour: unknown key"),
        (lambda d: d["recon"]["arms"]["vendor"].pop("acquisition"),
         r"unknown arm 'vendor'.*\[recon.arms.vendor\] acquisition"),
        (lambda d: d["recon"]["arms"].update(ghost={"acquisition": "shared"}),
         r"\[recon.arms.ghost\]: arm 'ghost' is not in \[sites\] arms"),
        (lambda d: d["recon"]["arms"].update(shared={"acquisition": "native"}),
         r"\[recon.arms.shared\] acquisition"),
        (lambda d: d["recon"].update(sites={"ge-premier-3t": {"acquisition": "shared"}}),
         r"\[recon.sites.ge-premier-3t\] acquisition: only arm tables"),
        (lambda d: d["recon"].update(sites={"ge-premier-3t": {"intensity_normalization":
                                                              "n4"}}),
         r"\[recon.sites.ge-premier-3t\].*intensity_normalization"),
    ],
)
def test_recon_tables_are_validated_naming_the_entry(edit, match):
    data = _base()
    edit(data)
    with pytest.raises(StudyError, match=match):
        study_from_mapping(data)


def test_resolution_order_and_vendor_presets():
    from mrharmony.simulation.site import load_site

    data = _base()
    data["recon"]["sites"] = {"ge-premier-3t": {"filter": "hanning"}}
    data["recon"]["arms"]["vendor"]["coil_combine"] = "rss"  # beside the preset: wins
    study = study_from_mapping(data)
    ge, siemens = load_site("ge-premier-3t"), load_site("siemens-prisma-3t")
    # the arm's preset is written in the arm table, so it wins over the site's filter
    assert resolve_recon(study.recon, ge, "vendor") == {
        "method": "auto", "backend": "numpy", "coil_combine": "rss", "filter": "fermi",
        "filter_radius": ge.native.kspace_filter_radius,
        "filter_width": ge.native.kspace_filter_width,
        "partial_fourier_method": VENDOR_RECON_PRESETS["ge"]["partial_fourier_method"],
        "intensity_normalization": "prescan" if ge.native.prescan_normalize else "none"}
    # the shared arm has no table: [recon], then the site's table
    assert resolve_recon(study.recon, ge, "shared")["filter"] == "hanning"
    assert resolve_recon(study.recon, siemens, "shared")["filter"] == "none"  # default
    assert resolve_recon(study.recon, siemens, "vendor")["coil_combine"] == "rss"


def test_site_table_must_name_a_site_of_the_study(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "gre.toml").write_text(GRE)
    (folder / "study.toml").write_text(STUDY + '\n[recon.sites.nowhere-9t]\nfilter = "none"\n')
    with pytest.raises(StudyError, match=r"\[recon.sites.nowhere-9t\]: 'nowhere-9t' is not"):
        run_study(folder / "study.toml", tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recon-flavours")
    (folder / "gre.toml").write_text(GRE)
    path = folder / "study.toml"
    path.write_text(STUDY)
    return path, run_study(path, folder / "out", workers=1, progress=False)


def test_two_recon_flavours_of_the_same_raw_file(tiny):
    from mrharmony.study.plan import plan_tasks, preflight

    path, result = tiny
    assert result.failed == 0 and result.skipped == 0, result.records
    study = load_study(path)
    plan = plan_tasks(study, preflight(study))
    stages = [s.stage for s in plan.specs]
    # 2 sites x 1 acquisition: one simulate task each, reused by both recon arms
    assert stages.count("simulate") == 2 and stages.count("recon") == 4
    store = result.out_dir / ".mrharmony" / "tasks"
    assert len(list((store / "simulate").iterdir())) == 2
    for site in study.sites.names:
        scans = {s.arm: s for s in plan.scans if s.site == site}
        assert scans["shared-recon"].simulate_key == scans["native-recon"].simulate_key
        assert scans["shared-recon"].recon_key != scans["native-recon"].recon_key
        images = {arm: np.asarray(nib.load(store / "recon" / s.recon_key / "image.nii.gz")
                                  .dataobj) for arm, s in scans.items()}
        diff = np.linalg.norm(images["native-recon"] - images["shared-recon"])
        assert diff > 0.01 * np.linalg.norm(images["shared-recon"]), site
        sidecar = json.loads((store / "recon" / scans["native-recon"].recon_key /
                              "image.json").read_text())["ReconstructionSettings"]
        assert sidecar["intensity_normalization"] == "prescan"  # both sites' vendors
        shared = json.loads((store / "recon" / scans["shared-recon"].recon_key /
                             "image.json").read_text())["ReconstructionSettings"]
        assert shared["coil_combination"] == "sum of squares"


def test_report_has_the_cov_per_flavour(tiny):
    _, result = tiny
    deriv = result.out_dir / DERIVATIVES
    numbers = json.loads((deriv / "report.json").read_text())
    flavour = numbers["recon_flavours"]["native-recon"]
    assert flavour["reference"] == "shared-recon"
    shared = numbers["arms"]["shared-recon"]["cov_pct"]
    native = numbers["arms"]["native-recon"]["cov_pct"]
    assert set(flavour["cov_pct"]) == set(shared) and len(shared) > 0
    for feature, added in flavour["added_cov_pct"].items():
        assert added == pytest.approx(native[feature] - shared[feature])
    html = (deriv / "report.html").read_text()
    assert "Harmonized reconstruction" in html and "cov_recon_flavours" in html
    assert (deriv / "figures" / "cov_recon_flavours.png").is_file()


def test_study_without_flavours_keeps_its_recon_task_keys():
    """Recon tasks of a study without recon tables have the parameters they had."""
    from mrharmony.simulation.site import load_site
    from mrharmony.study.plan import recon_params

    data = _base()
    data["sites"]["arms"] = ["shared"]
    del data["recon"]
    study = study_from_mapping(data)
    params = recon_params(study, load_site("ge-premier-3t"), "shared", "none")
    assert params == {"method": "auto", "backend": "numpy", "maps": "none"}


@pytest.mark.parametrize("name", ["harmonized-recon", "harmonized-recon-cohort"])
def test_shipped_study_validates(name):
    path = Path(__file__).parents[1] / "examples" / "studies" / f"{name}.toml"
    study = load_study(path)
    assert {study.recon.acquisition_of(a) for a in study.sites.arms} == {"shared"}
    assert study.recon.same_at_every_site("shared-recon")
    assert not study.recon.same_at_every_site("native-recon")
