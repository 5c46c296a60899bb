"""ISMRMRD headers from protocol + scanner, and from a .seq file with our definitions."""

from __future__ import annotations

import ismrmrd.xsd as mrd
import pytest

from mrharmony.errors import ConfigError, SequenceFileError
from mrharmony.sequences import build, write_seq
from mrharmony.sequences.header import ismrmrd_header, ismrmrd_header_xml

from conftest import CORPUS, EXAMPLES


def test_header_from_protocol_and_scanner():
    xml = ismrmrd_header_xml(EXAMPLES / "gre2d.toml", "philips-ingenia-1.5t", receiver_channels=16)
    h = mrd.CreateFromDocument(xml)  # valid ISMRMRD XML that the reference parser reads
    enc = h.encoding[0]
    assert (enc.encodedSpace.matrixSize.x, enc.encodedSpace.matrixSize.y) == (128, 128)
    assert enc.encodedSpace.fieldOfView_mm.x == pytest.approx(256.0)
    assert enc.encodedSpace.fieldOfView_mm.z == pytest.approx(5.0)  # slice thickness
    assert enc.trajectory == mrd.trajectoryType.CARTESIAN
    lim = enc.encodingLimits
    assert (lim.kspace_encoding_step_1.maximum, lim.kspace_encoding_step_1.center) == (127, 64)
    assert lim.slice.maximum == 2  # three slices, from the SLC labels
    assert h.sequenceParameters.TE[0] == pytest.approx(5.0, rel=0.01)  # ms
    assert h.sequenceParameters.TR[0] == pytest.approx(12.0, rel=0.01)
    assert h.sequenceParameters.flipAngle_deg[0] == pytest.approx(15.0)
    assert h.acquisitionSystemInformation.systemFieldStrength_T == pytest.approx(1.5)
    assert h.acquisitionSystemInformation.receiverChannels == 16
    assert h.experimentalConditions.H1resonanceFrequency_Hz == round(42.576e6 * 1.5)


def test_header_from_seq_file_matches_protocol(tmp_path):
    seq = build(EXAMPLES / "gre3d.toml", "ge-signa-premier")
    path = write_seq(seq, tmp_path / "gre3d.seq")
    from_file = ismrmrd_header(path)
    from_protocol = ismrmrd_header(EXAMPLES / "gre3d.toml", "ge-signa-premier")
    assert mrd.ToXML(from_file) == mrd.ToXML(from_protocol)
    enc = from_file.encoding[0]
    assert enc.encodedSpace.matrixSize.z == 16
    assert enc.encodingLimits.kspace_encoding_step_2.maximum == 15
    assert from_file.acquisitionSystemInformation.systemVendor == "GE"


def test_header_needs_a_scanner_for_a_protocol():
    with pytest.raises(ConfigError, match="needs a scanner"):
        ismrmrd_header(EXAMPLES / "gre2d.toml")


def test_foreign_seq_without_definitions_is_a_named_error():
    path = CORPUS / "11_koma_v12_radial_JEMRIS.seq"
    if not path.exists():
        pytest.skip("shared corpus not present")
    with pytest.raises(SequenceFileError, match=r"\[DEFINITIONS\] lacks MatrixSize"):
        ismrmrd_header(path)
