"""Scanner profiles are data, validated, and convert to pypulseq limits exactly."""

from __future__ import annotations

import pytest

from mrharmony.errors import ScannerError
from mrharmony.sequences.scanner import GAMMA_HZ_PER_T, list_scanners, load_scanner

REQUIRED = {
    "siemens-prisma", "siemens-skyra", "siemens-freemax", "ge-signa-premier",
    "ge-discovery-mr750", "philips-ingenia-1.5t", "philips-elition-3t", "uih-umr790",
    "siemens-terra-7t",
}


def test_required_profiles_are_shipped():
    assert set(list_scanners()) >= REQUIRED


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_profile_is_complete_and_cited(name):
    s = load_scanner(name)
    assert s.name == name
    assert s.source.strip()
    assert 0.5 <= s.field_strength_t <= 7
    # Block raster is a multiple of the gradient raster (validated on load).
    ratio = s.block_duration_raster_us / s.grad_raster_time_us
    assert ratio == pytest.approx(round(ratio))


def test_field_strengths_cover_055_to_7_tesla():
    fields = {load_scanner(n).field_strength_t for n in list_scanners()}
    assert {0.55, 1.5, 3.0, 7.0} <= fields


def test_to_opts_converts_units_exactly():
    s = load_scanner("siemens-prisma")
    opts = s.to_opts()
    assert opts.max_grad == pytest.approx(80e-3 * GAMMA_HZ_PER_T)
    assert opts.max_slew == pytest.approx(200 * GAMMA_HZ_PER_T)
    assert opts.grad_raster_time == pytest.approx(10e-6)
    assert opts.rf_dead_time == pytest.approx(100e-6)
    assert opts.B0 == 3.0
    ge = load_scanner("ge-discovery-mr750").to_opts()
    assert ge.grad_raster_time == pytest.approx(4e-6)
    assert ge.adc_raster_time == pytest.approx(2e-6)
    assert s.larmor_hz == pytest.approx(127.728e6)


def test_unknown_scanner_suggests_the_closest():
    with pytest.raises(ScannerError, match="did you mean 'siemens-prisma'"):
        load_scanner("siemens-prima")


def test_user_profile_file(tmp_path):
    text = (load_scanner.__globals__["_shipped_dir"]() / "siemens-skyra.toml").read_text()
    path = tmp_path / "my.toml"
    path.write_text(text.replace('name = "siemens-skyra"', 'name = "my-skyra"'))
    assert load_scanner(path).name == "my-skyra"
    path.write_text(text.replace("max_slew_t_per_m_per_s = 200", "max_slew_t_per_m_per_s = -1"))
    with pytest.raises(ScannerError, match="max_slew_t_per_m_per_s"):
        load_scanner(path)
    path.write_text(text.replace("block_duration_raster_us = 10", "block_duration_raster_us = 15"))
    with pytest.raises(ScannerError, match="block_duration_raster_us"):
        load_scanner(path)
