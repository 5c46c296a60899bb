"""MRD v2 (mrd-python, yardl binary): files, header/acquisition/image conversion, the
simulator's `.mrd` output, and MRD v2 streams to `mrharmony serve`."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import shutil
import socket
import subprocess

import ismrmrd
import ismrmrd.xsd as x
import mrd
import nibabel as nib
import numpy as np
import pytest
from xsdata.models.datatype import XmlDate, XmlTime

from mrharmony.cli import main
from mrharmony.errors import RawDataError
from mrharmony.formats import mrd2
from mrharmony.formats.raw import load_raw, read_raw, read_raw_header, sniff_format
from mrharmony.recon.pipeline import reconstruct
from mrharmony.recon.stream.client import image_to_recon, stream_acquisitions, stream_file
from mrharmony.recon.stream.scanner import synthetic_cartesian_scan
from mrharmony.recon.stream.server import ServerSettings, StreamServer

from metrics import nrmse

TIMEOUT_S = 60.0  # guard against hangs only, not a timing assertion
SHEPP_LOGAN = shutil.which("ismrmrd_generate_cartesian_shepp_logan")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def encoded_header(header) -> bytes:
    """The MRD v2 bytes of a header: equal bytes = equal headers at MRD v2 precision."""
    return mrd2.Mrd2Encoder().begin(mrd2.header_to_mrd2(header))


def all_acqs(raw) -> list:
    return list(raw.noise) + list(raw.acquisitions)


def assert_same_acquisitions(a: list, b: list) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b, strict=True):
        assert bytes(p.getHead()) == bytes(q.getHead())
        assert np.array_equal(p.data, q.data) and np.array_equal(p.traj, q.traj)


@pytest.fixture(scope="module")
def shepp_logan(tmp_path_factory):
    """The ISMRMRD C++ tools' Shepp–Logan (noise scan, 4 coils, stored k-space coordinates)
    and its MRD v2 conversion."""
    if SHEPP_LOGAN is None:
        pytest.skip("ismrmrd_generate_cartesian_shepp_logan (ismrmrd-tools) is not installed")
    folder = tmp_path_factory.mktemp("shepp")
    h5 = folder / "sl.h5"
    subprocess.run([SHEPP_LOGAN, "-m", "64", "-c", "4", "-C", "-k", "-o", str(h5)], check=True,
                   cwd=folder, capture_output=True, timeout=TIMEOUT_S)
    out = folder / "sl.mrd"
    assert main(["convert", "mrd", str(h5), "-o", str(out)]) == 0
    return h5, out


# --------------------------------------------------------------------------- files


def test_converted_file_reads_back_with_mrd_pythons_own_reader(shepp_logan):
    h5, out = shepp_logan
    ref = read_raw(h5)
    assert mrd2.is_mrd2(out) and not mrd2.is_mrd2(h5)
    assert sniff_format(out) == "mrd2"
    with mrd.BinaryMrdReader(str(out)) as reader:
        header = reader.read_header()
        items = list(reader.read_data())
    assert header.encoding[0].encoded_space.matrix_size == mrd.MatrixSizeType(x=128, y=64, z=1)
    assert header.experimental_conditions.h1resonance_frequency_hz == \
        ref.header.experimentalConditions.H1resonanceFrequency_Hz
    acqs = all_acqs(ref)
    assert len(items) == len(acqs) == 65
    for item, a in zip(items, acqs, strict=True):
        assert isinstance(item, mrd.StreamItem.Acquisition)
        v2, h = item.value, a.getHead()
        assert int(v2.head.flags) == int(h.flags)
        for name in ("kspace_encode_step_1", "kspace_encode_step_2", "average", "slice",
                     "contrast", "phase", "repetition", "set", "segment"):
            assert getattr(v2.head.idx, name) == getattr(h.idx, name)
        assert v2.head.idx.user == list(h.idx.user)
        for name in ("measurement_uid", "scan_counter", "acquisition_time_stamp",
                     "discard_pre", "discard_post", "center_sample", "encoding_space_ref",
                     "sample_time_us"):
            assert getattr(v2.head, name) == getattr(h, name), name
        for name in ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position"):
            assert np.array_equal(getattr(v2.head, name), np.array(getattr(h, name), np.float32))
        assert v2.head.physiology_time_stamp == list(h.physiology_time_stamp)
        assert v2.head.user_int == list(h.user_int)
        assert v2.head.user_float == list(h.user_float)
        assert v2.coils() == h.active_channels and v2.samples() == h.number_of_samples
        assert np.array_equal(v2.data, a.data)  # complex64 (channels, samples), bit for bit
        assert v2.trajectory.shape == (h.trajectory_dimensions, h.number_of_samples)
        assert np.array_equal(v2.trajectory, a.traj.T)
    assert any(v.value.trajectory.size for v in items)  # the k-space coordinates (-k)


def test_recon_of_the_mrd_file_equals_the_recon_of_the_h5(shepp_logan, tmp_path, capsys):
    h5, out = shepp_logan
    assert main(["recon", str(h5), "-o", str(tmp_path / "h5.nii.gz")]) == 0
    assert main(["recon", str(out), "-o", str(tmp_path / "mrd.nii.gz")]) == 0
    a = nib.load(tmp_path / "h5.nii.gz")
    b = nib.load(tmp_path / "mrd.nii.gz")
    assert np.array_equal(a.get_fdata(), b.get_fdata())
    assert np.array_equal(a.affine, b.affine)


def test_round_trip_h5_mrd_h5_is_identical(shepp_logan, tmp_path, capsys):
    h5, out = shepp_logan
    back = tmp_path / "back.h5"
    assert main(["convert", "mrd", str(out), "-o", str(back)]) == 0
    ref, again = read_raw(h5), read_raw(back)
    assert_same_acquisitions(all_acqs(ref), all_acqs(again))
    assert encoded_header(ref.header) == encoded_header(again.header)
    assert x.ToXML(ref.header) == x.ToXML(again.header)  # all its reals are float32 values
    # never overwrite without --force; the direction must match the names
    assert main(["convert", "mrd", str(out), "-o", str(back)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["convert", "mrd", str(out), "-o", str(back), "--force"]) == 0
    assert main(["convert", "mrd", str(h5), "-o", str(tmp_path / "wrong.h5")]) == 2
    err = capsys.readouterr().err
    assert ".mrd" in err and len(err.strip().splitlines()) == 1


def test_header_only_read_equals_the_full_read_in_both_formats(shepp_logan, tmp_path):
    """read_raw_header: the same header as load_raw, without the acquisitions; a file
    cut after its header still gives the header (the data are never read)."""
    h5, out = shepp_logan
    for path in (h5, out):
        assert x.ToXML(read_raw_header(path)) == x.ToXML(load_raw(path).header)
    blob = out.read_bytes()
    cut = tmp_path / "cut.mrd"
    cut.write_bytes(blob[:len(blob) // 2])
    assert x.ToXML(read_raw_header(cut)) == x.ToXML(load_raw(out).header)
    with pytest.raises(RawDataError, match="truncated"):  # while the full read refuses it
        mrd2.read_mrd2_raw(cut)
    (tmp_path / "junk.bin").write_bytes(b"not raw data")
    with pytest.raises(RawDataError, match="not ISMRMRD"):
        read_raw_header(tmp_path / "junk.bin")
    with pytest.raises(RawDataError, match="no such file"):
        read_raw_header(tmp_path / "missing.h5")


def test_truncated_or_corrupt_mrd_raises_one_line(shepp_logan, tmp_path, capsys):
    _, out = shepp_logan
    blob = out.read_bytes()
    for n, what in ((len(blob) // 2, "truncated"), (200, "truncated")):
        bad = tmp_path / f"cut{n}.mrd"
        bad.write_bytes(blob[:n])
        with pytest.raises(RawDataError, match=what) as info:
            mrd2.read_mrd2_raw(bad)
        assert "\n" not in str(info.value)
    bad = tmp_path / "cut.mrd"
    bad.write_bytes(blob[:len(blob) // 2])
    assert main(["recon", str(bad), "-o", str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "truncated MRD v2 file" in err and len(err.splitlines()) == 1
    # a length field over the file size is refused before anything is allocated
    length, pos = 0, 9  # the schema: unsigned varint length after magic and version
    for shift in range(0, 64, 7):
        length |= (blob[pos] & 0x7F) << shift
        pos += 1
        if blob[pos - 1] < 0x80:
            break
    # header present, no version, subject information present, a patient name of 1 TiB
    huge = blob[:pos + length] + b"\x01\x00\x01\x01" + b"\x80\x80\x80\x80\x80\x20"
    (tmp_path / "huge.mrd").write_bytes(huge)
    with pytest.raises(RawDataError, match="over the limit"):
        mrd2.read_mrd2_raw(tmp_path / "huge.mrd")
    (tmp_path / "nothing.mrd").write_bytes(b"not mrd at all")
    assert not mrd2.is_mrd2(tmp_path / "nothing.mrd")
    with pytest.raises(RawDataError, match="not ISMRMRD"):
        load_raw(tmp_path / "nothing.mrd")


def test_writers_refuse_to_overwrite_and_leave_no_partial_file(shepp_logan, tmp_path):
    h5, _ = shepp_logan
    raw = read_raw(h5)
    target = tmp_path / "x.mrd"
    mrd2.write_mrd2_raw(target, raw)
    before = target.read_bytes()
    with pytest.raises(FileExistsError):
        mrd2.write_mrd2_raw(target, raw)
    broken = read_raw(h5)
    broken.acquisitions[3] = object()  # fails half-way through the items
    with pytest.raises(AttributeError):
        mrd2.write_mrd2_raw(target, broken, force=True)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mrd"]


# --------------------------------------------------------------------------- header


def full_v1_header() -> x.ismrmrdHeader:
    """A v1 header with every field both versions hold; reals exact in float32."""
    limit = x.limitType(minimum=0, maximum=63, center=32)
    upl = [x.userParameterLongType(name="a", value=-7)]
    upd = [x.userParameterDoubleType(name="b", value=0.1)]  # float64 in both versions
    ups = [x.userParameterStringType(name="c", value="text")]
    user = x.userParametersType(
        userParameterLong=upl, userParameterDouble=upd, userParameterString=ups,
        userParameterBase64=[x.userParameterBase64Type(name="d", value=b"\x00\x01bin")])
    enc = x.encodingType(
        encodedSpace=x.encodingSpaceType(matrixSize=x.matrixSizeType(x=128, y=64, z=1),
                                         fieldOfView_mm=x.fieldOfViewMm(x=512.0, y=256.0, z=5.5)),
        reconSpace=x.encodingSpaceType(matrixSize=x.matrixSizeType(x=64, y=64, z=1),
                                       fieldOfView_mm=x.fieldOfViewMm(x=256.0, y=256.0, z=5.5)),
        encodingLimits=x.encodingLimitsType(
            **{name: x.limitType(minimum=0, maximum=i, center=i // 2) for i, name in enumerate(
                ["kspace_encoding_step_0", "kspace_encoding_step_1", "kspace_encoding_step_2",
                 "average", "slice", "contrast", "phase", "repetition", "set", "segment",
                 *(f"user_{k}" for k in range(8))], start=1)}),
        trajectory=x.trajectoryType.SPIRAL,
        trajectoryDescription=x.trajectoryDescriptionType(
            identifier="vds", userParameterLong=upl, userParameterDouble=upd,
            userParameterString=ups, comment="variable density"),
        parallelImaging=x.parallelImagingType(
            accelerationFactor=x.accelerationFactorType(kspace_encoding_step_1=2,
                                                        kspace_encoding_step_2=1),
            calibrationMode=x.calibrationModeType.EMBEDDED,
            interleavingDimension=x.interleavingDimensionType.PHASE,
            multiband=x.multibandType(spacing=[x.multibandSpacingType(dZ=[1.5, -2.25])],
                                      deltaKz=0.5, multiband_factor=2,
                                      calibration=x.multibandCalibrationType.FULL3_D,
                                      calibration_encoding=1)),
        echoTrainLength=4)
    enc2 = x.encodingType(encodedSpace=enc.encodedSpace, reconSpace=enc.reconSpace,
                          encodingLimits=x.encodingLimitsType(kspace_encoding_step_1=limit),
                          trajectory=x.trajectoryType.CARTESIAN)
    return x.ismrmrdHeader(
        version=2,
        subjectInformation=x.subjectInformationType(
            patientName="Doe^J", patientWeight_kg=70.5, patientHeight_m=1.75, patientID="P1",
            patientBirthdate=XmlDate(1980, 2, 29), patientGender="F"),
        studyInformation=x.studyInformationType(
            studyDate=XmlDate(2026, 12, 2), studyTime=XmlTime(9, 41, 7, 123456789),
            studyID="S1", accessionNumber=42, referringPhysicianName="Dr",
            studyDescription="d", studyInstanceUID="1.2.3", bodyPartExamined="HEAD"),
        measurementInformation=x.measurementInformationType(
            measurementID="M1", seriesDate=XmlDate(2026, 12, 1), seriesTime=XmlTime(23, 59, 59),
            patientPosition=x.patientPositionType.FFDR,
            relativeTablePosition=x.threeDimensionalFloat(x=1.0, y=-2.0, z=3.5),
            initialSeriesNumber=3, protocolName="gre", sequenceName="fl2d",
            seriesDescription="sd",
            measurementDependency=[x.measurementDependencyType(dependencyType="noise",
                                                               measurementID="M0")],
            seriesInstanceUIDRoot="1.2", frameOfReferenceUID="1.2.4",
            referencedImageSequence=x.referencedImageSequenceType(
                referencedSOPInstanceUID=["1.1", "1.2"])),
        acquisitionSystemInformation=x.acquisitionSystemInformationType(
            systemVendor="V", systemModel="M", systemFieldStrength_T=2.89,  # not float32-exact
            relativeReceiverNoiseBandwidth=0.79, receiverChannels=2,
            coilLabel=[x.coilLabelType(coilNumber=0, coilName="H1"),
                       x.coilLabelType(coilNumber=5, coilName="H2")],
            institutionName="I", stationName="S", deviceID="D", deviceSerialNumber="123"),
        experimentalConditions=x.experimentalConditionsType(H1resonanceFrequency_Hz=123200000),
        encoding=[enc, enc2],
        sequenceParameters=x.sequenceParametersType(
            TR=[12.0, 24.0], TE=[5.0], TI=[900.0], flipAngle_deg=[15.0],
            sequence_type="Flash", echo_spacing=[0.5],
            diffusionDimension=x.diffusionDimensionType.USER_3,
            diffusion=[x.diffusionType(gradientDirection=x.gradientDirectionType(
                rl=0.0, ap=0.5, fh=-1.0), bvalue=1000.0)],
            diffusionScheme="3-dir"),
        userParameters=user,
        waveformInformation=[x.waveformInformationType(
            waveformName="ecg", waveformType=x.waveformInformationTypeWaveformType.ECG,
            userParameters=user)],
    )


def v2_round_trip(header):
    """Through an MRD v2 byte stream and back (what a file or a stream does)."""
    buf = io.BytesIO(mrd2.Mrd2Encoder().begin(mrd2.header_to_mrd2(header)) + b"\x00")
    reader = mrd2.open_mrd2_reader(buf, max_field_bytes=1 << 20)
    out = reader.read_header()
    assert list(reader.read_data()) == []
    return out


def test_header_conversion_is_exact_both_ways():
    v1 = full_v1_header()
    v2 = mrd2.header_to_mrd2(v1)
    # v1 -> v2: every field, spot-checked where names, units or types change
    assert v2.subject_information.patient_gender == mrd.PatientGender.F
    assert v2.subject_information.patient_birthdate == datetime.date(1980, 2, 29)
    assert v2.study_information.study_time == mrd.Time.from_components(9, 41, 7, 123456789)
    assert v2.measurement_information.patient_position == mrd.PatientPosition.F_FDR
    assert v2.encoding[0].trajectory == mrd.Trajectory.SPIRAL
    assert v2.encoding[0].parallel_imaging.multiband.calibration == mrd.Calibration.FULL_3D
    assert v2.encoding[0].encoding_limits.user_7 == mrd.LimitType(minimum=0, maximum=18,
                                                                 center=9)
    assert v2.sequence_parameters.diffusion_dimension == mrd.DiffusionDimension.USER_3
    assert v2.user_parameters.user_parameter_base64[0].value == \
        base64.b64encode(b"\x00\x01bin").decode()
    assert v2.acquisition_system_information.coil_label[1] == \
        mrd.CoilLabelType(coil_number=5, coil_name="H2")
    # v2 -> v1 gives the v1 header back, exactly
    assert mrd2.header_from_mrd2(v2) == v1
    # through MRD v2 bytes: reals become float32, the rest is exact
    back = mrd2.header_from_mrd2(v2_round_trip(v1))
    assert back.acquisitionSystemInformation.systemFieldStrength_T == pytest.approx(
        2.89, rel=1e-7, abs=0)
    assert back.acquisitionSystemInformation.systemFieldStrength_T == float(np.float32(2.89))
    back.acquisitionSystemInformation.systemFieldStrength_T = 2.89
    back.acquisitionSystemInformation.relativeReceiverNoiseBandwidth = 0.79
    assert back == v1
    # and the XML of the result parses with the ISMRMRD schema
    assert x.CreateFromDocument(x.ToXML(back)) == back


def test_header_from_mrd2_starting_in_v2():
    v2 = mrd2.header_to_mrd2(full_v1_header())
    v2.encoding[1].parallel_imaging = mrd.ParallelImagingType(
        acceleration_factor=mrd.AccelerationFactorType(kspace_encoding_step_1=3,
                                                       kspace_encoding_step_2=2),
        calibration_mode=mrd.CalibrationMode.SEPARATE,
        interleaving_dimension=mrd.InterleavingDimension.AVERAGE)
    assert mrd2.header_to_mrd2(mrd2.header_from_mrd2(v2)) == v2
    # MRD v2 NOACCELERATION does not exist in v1: no calibrationMode there
    v2.encoding[1].parallel_imaging.calibration_mode = mrd.CalibrationMode.NOACCELERATION
    assert mrd2.header_from_mrd2(v2).encoding[1].parallelImaging.calibrationMode is None


# --------------------------------------------------------------------------- acquisitions


def random_acquisition(rng: np.random.Generator, *, nc: int = 3, ns: int = 20, nt: int = 2):
    head = ismrmrd.AcquisitionHeader()
    head.version = 1
    head.flags = int(rng.integers(0, 2**63))
    head.measurement_uid = 11
    head.scan_counter = 7
    head.acquisition_time_stamp = 123456
    head.physiology_time_stamp[:] = [1, 2, 3]
    head.number_of_samples = ns
    head.active_channels = nc
    head.available_channels = 70
    head.channel_mask[:] = [0b101, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    head.channel_mask[1] = 1 << 5  # channel 69
    head.discard_pre, head.discard_post, head.center_sample = 2, 3, 9
    head.encoding_space_ref = 1
    head.trajectory_dimensions = nt
    head.sample_time_us = 2.5
    for name in ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position"):
        getattr(head, name)[:] = rng.standard_normal(3).astype(np.float32).tolist()
    for i, name in enumerate(("kspace_encode_step_1", "kspace_encode_step_2", "average",
                              "slice", "contrast", "phase", "repetition", "set", "segment")):
        setattr(head.idx, name, 100 * i + 1)
    head.idx.user[:] = list(range(8))
    head.user_int[:] = [-1, 2, -3, 4, -5, 6, -7, 8]
    head.user_float[:] = rng.standard_normal(8).astype(np.float32).tolist()
    data = (rng.standard_normal((nc, ns)) + 1j * rng.standard_normal((nc, ns))).astype(
        np.complex64)
    traj = rng.standard_normal((ns, nt)).astype(np.float32)
    return ismrmrd.Acquisition(head, data=data, trajectory=traj)


def test_acquisition_conversion_keeps_every_field():
    rng = np.random.default_rng(3)
    for nt in (0, 2, 3):
        a = random_acquisition(rng, nt=nt)
        v2 = mrd2.acquisition_to_mrd2(a)
        assert v2.head.channel_order == [0, 2, 69]
        assert int(v2.head.flags) == int(a.flags)  # the same bit positions
        assert v2.trajectory.shape == (nt, 20)
        b = mrd2.acquisition_from_mrd2(v2)
        assert bytes(a.getHead()) == bytes(b.getHead())
        assert np.array_equal(a.data, b.data) and np.array_equal(a.traj, b.traj)
        _, payload = mrd2.acquisition_bytes_from_mrd2(v2)
        assert payload == a.to_bytes()  # the v1 ACQUISITION payload (after the id)
    # a v2 value that v1 cannot hold is refused by name
    v2 = mrd2.acquisition_to_mrd2(random_acquisition(rng))
    v2.head.idx.slice = 70000
    with pytest.raises(RawDataError, match="slice"):
        mrd2.acquisition_from_mrd2(v2)
    v2.head.idx.slice = 1
    v2.head.user_int = list(range(9))
    with pytest.raises(RawDataError, match="user ints"):
        mrd2.acquisition_from_mrd2(v2)


# --------------------------------------------------------------------------- images


def test_images_round_trip_through_an_mrd2_image_file(shepp_logan, tmp_path):
    h5, _ = shepp_logan
    raw = read_raw(h5)
    images = reconstruct(raw, method="fft", backend="numpy")
    path = mrd2.write_mrd2_images(tmp_path / "img.mrd", images, header=raw.header)
    with pytest.raises(FileExistsError):
        mrd2.write_mrd2_images(path, images)
    with mrd.BinaryMrdReader(str(path)) as reader:
        assert reader.read_header().encoding[0].recon_space.matrix_size.x == 64
        items = list(reader.read_data())
    assert [type(i) for i in items] == [mrd.StreamItem.ImageFloat] * len(images)
    first = items[0].value
    assert first.head.image_type == mrd.ImageType.MAGNITUDE and first.head.image_index == 1
    assert isinstance(first.meta["mrharmony_recon"][0], mrd.ImageMetaValue.String)
    header, back = mrd2.read_mrd2_images(path)
    assert header.encoding[0].reconSpace.matrixSize.x == 64
    for im, img in zip(images, back, strict=True):
        r = image_to_recon(img)
        assert np.array_equal(r.data, im.data)
        assert np.array_equal(r.affine_ras(), im.affine_ras())
        assert r.meta["recon"]["method"] == "fft"


def test_image_meta_values_are_typed_in_v2_and_text_in_v1():
    img = ismrmrd.Image.from_array(np.arange(6, dtype=np.complex64).reshape(1, 1, 2, 3),
                                   transpose=False)
    img.image_type = ismrmrd.IMTYPE_COMPLEX
    img.slice, img.image_series_index = 4, 2
    img.meta = {"te_ms": "5.25", "n": "3", "name": "gre", "list": ["1", "x"]}
    item = mrd2.image_to_mrd2(img)
    assert isinstance(item, mrd.StreamItem.ImageComplexFloat)
    meta = item.value.meta
    assert meta["te_ms"] == [mrd.ImageMetaValue.Float64(5.25)]
    assert meta["n"] == [mrd.ImageMetaValue.Int64(3)]
    assert meta["list"] == [mrd.ImageMetaValue.Int64(1), mrd.ImageMetaValue.String("x")]
    back = mrd2.image_from_mrd2(item)
    assert dict(back.meta) == {"te_ms": "5.25", "n": "3", "name": "gre", "list": ["1", "x"]}
    assert back.slice == 4 and back.image_series_index == 2
    assert back.image_type == ismrmrd.IMTYPE_COMPLEX
    assert np.array_equal(back.data, img.data)


# --------------------------------------------------------------------------- simulator


def test_simulate_writes_mrd2_for_an_mrd_suffix(tmp_path, capsys):
    from test_simulation_raw import gre, make_phantom

    from mrharmony.sequences import build, write_seq
    from mrharmony.simulation import load_site

    phantom = make_phantom(32).save(tmp_path / "phantom")
    seq = write_seq(build(gre(matrix=[16, 16]), load_site("ge-mr750-3t").profile),
                    tmp_path / "gre.seq")
    outs = {}
    for suffix in (".mrd", ".h5"):
        outs[suffix] = tmp_path / f"raw{suffix}"
        assert main(["simulate", str(seq), str(phantom), "--site", "ge-mr750-3t",
                     "-o", str(outs[suffix]), "--seed", "4"]) == 0
    assert mrd2.is_mrd2(outs[".mrd"])
    a, b = load_raw(outs[".mrd"]), load_raw(outs[".h5"])
    assert_same_acquisitions(all_acqs(a), all_acqs(b))  # same seed: the same scan
    assert encoded_header(a.header) == encoded_header(b.header)
    with mrd.BinaryMrdReader(str(outs[".mrd"])) as reader:
        reader.read_header()
        items = list(reader.read_data())
    assert len(items) == len(all_acqs(b))  # in file order, noise scans included
    assert main(["simulate", str(seq), str(phantom), "--site", "ge-mr750-3t",
                 "-o", str(outs[".mrd"])]) == 2  # never overwrites without --force


# --------------------------------------------------------------------------- streaming


async def started(**kw) -> StreamServer:
    kw.setdefault("executor", "thread")
    return await StreamServer(ServerSettings(port=0, **kw)).start()


def by_slice(images) -> dict[int, np.ndarray]:
    return {int(r.slice): np.asarray(r.data) for r in map(image_to_recon, images)}


def test_mrd2_client_gets_the_v1_and_offline_images(tmp_path):
    header, acqs = synthetic_cartesian_scan(nx=48, ny=48, n_coils=4, n_slices=3, seed=2)
    offline = {im.slice: im.data for im in reconstruct(
        read_raw_from(header, acqs, tmp_path), method="auto", backend="numpy")}

    async def go():
        server = await started(save_raw=tmp_path / "saved")
        try:
            v2 = await stream_acquisitions(header, acqs, port=server.port, mrd2=True)
            v1 = await stream_acquisitions(header, acqs, port=server.port)
            return v1, v2
        finally:
            await server.shutdown()

    v1, v2 = run(go())
    assert v2.closed and not v2.texts and len(v2.images) == 3
    a, b = by_slice(v1.images), by_slice(v2.images)
    assert sorted(b) == [0, 1, 2]
    for s in b:
        assert nrmse(a[s], b[s]) < 1e-6
        assert nrmse(offline[s], b[s]) < 1e-6
    # geometry and meta come through the MRD v2 images too
    # (images arrive in completion order: compare the same slice)
    r1 = next(r for r in map(image_to_recon, v1.images) if r.slice == 0)
    r2 = next(r for r in map(image_to_recon, v2.images) if r.slice == 0)
    assert np.allclose(r1.affine_ras(), r2.affine_ras(), atol=1e-5)
    assert r2.meta["recon"]["method"] == r1.meta["recon"]["method"]
    assert sorted(i.image_index for i in v2.images) == [1, 2, 3]
    # --save-raw keeps the MRD v2 stream as an ISMRMRD file, every acquisition intact
    saved = sorted((tmp_path / "saved").glob("*.h5"))
    assert len(saved) == 2
    assert_same_acquisitions(acqs, all_acqs(read_raw(saved[0])))


def read_raw_from(header, acqs, folder):
    path = folder / "scan.h5"
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=True) as ds:
        ds.write_xml_header(ismrmrd.xsd.ToXML(header))
        for a in acqs:
            ds.append_acquisition(a)
    return read_raw(path)


def test_stream_an_mrd_file_via_the_cli(shepp_logan, tmp_path, capsys):
    from test_stream_cli import BackgroundServer

    h5, out = shepp_logan
    with BackgroundServer() as bg:
        port = str(bg.server.port)
        assert main(["stream", str(out), "--port", port, "-o", str(tmp_path / "v2")]) == 0
        assert main(["stream", str(h5), "--port", port, "-o", str(tmp_path / "v1")]) == 0
        assert main(["stream", str(out), "--mrd1", "--port", port,
                     "-o", str(tmp_path / "v1b")]) == 0
    a = nib.load(tmp_path / "v1" / "sl.nii.gz").get_fdata()
    for other in ("v2", "v1b"):
        b = nib.load(tmp_path / other / "sl.nii.gz").get_fdata()
        assert nrmse(a, b) < 1e-6
    assert main(["recon", str(out), "-o", str(tmp_path / "off.nii.gz")]) == 0
    assert nrmse(nib.load(tmp_path / "off.nii.gz").get_fdata(), a) < 1e-6


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def raw_exchange(port: int, blob: bytes) -> bytes:
    """Send bytes, half-close, return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        sock.sendall(blob)
        sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock)


def test_bad_mrd2_streams_get_an_error_and_the_server_survives(tmp_path):
    header, acqs = synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=1, seed=4)
    good = mrd2.Mrd2Encoder()
    start = good.begin(mrd2.header_to_mrd2(header))
    body = good.items([mrd.StreamItem.Acquisition(mrd2.acquisition_to_mrd2(a)) for a in acqs])

    async def go():
        server = await started(idle_timeout_s=10.0)
        try:
            port = server.port
            garbage = await asyncio.to_thread(raw_exchange, port, b"yardl" + bytes(range(200)))
            cut = await asyncio.to_thread(raw_exchange, port, start + body[: len(body) // 2])
            unknown = await stream_acquisitions(header, acqs, port=port, mrd2=True,
                                                config="no_such_pipeline.xml")
            after = await stream_acquisitions(header, acqs, port=port, mrd2=True)
        finally:
            await server.shutdown()
        return garbage, cut, unknown, after, server.connections_served

    garbage, cut, unknown, after, served = run(go())
    assert garbage == b""  # nothing decodes: the connection is closed at once
    reply = io.BytesIO(cut)  # the header came back, then the stream ends without its end
    reader = mrd2.open_mrd2_reader(reply, max_field_bytes=1 << 24)
    assert reader.read_header() is not None
    with pytest.raises(EOFError):
        list(reader.read_data())
    assert not unknown.closed and not unknown.images
    assert len(unknown.texts) == 1 and "ended early" in unknown.texts[0]
    assert after.closed and len(after.images) == 1  # the server is still serving
    assert served == 4


def test_stream_file_of_an_mrd_file_speaks_mrd2(shepp_logan):
    _, out = shepp_logan

    async def go():
        server = await started()
        try:
            return await stream_file(out, port=server.port)
        finally:
            await server.shutdown()

    header, result = run(go())
    assert result.closed and len(result.images) == 1
    ref = reconstruct(load_raw(out), method="auto", backend="numpy")[0].data
    assert nrmse(ref, image_to_recon(result.images[0]).data) < 1e-6
    assert header.encoding[0].encodedSpace.matrixSize.x == 128


def test_mrd2_stream_with_waveforms_and_images_and_an_idle_client(tmp_path):
    header, acqs = synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=1, seed=5)
    enc = mrd2.Mrd2Encoder()
    start = enc.begin(mrd2.header_to_mrd2(header))
    wav = mrd.WaveformUint32(flags=0, measurement_uid=1, scan_counter=2, time_stamp=3,
                             sample_time_us=2.5, waveform_id=4,
                             data=np.arange(12, dtype=np.uint32).reshape(2, 6))
    img = mrd.Image(head=mrd.ImageHeader(image_type=mrd.ImageType.MAGNITUDE, slice=7),
                    data=np.ones((1, 1, 4, 4), np.float32))
    items = [mrd.StreamItem.WaveformUint32(wav), mrd.StreamItem.ImageFloat(img)]
    items += [mrd.StreamItem.Acquisition(mrd2.acquisition_to_mrd2(a)) for a in acqs]
    blob = start + enc.items(items) + enc.end()

    async def go():
        server = await started(save_raw=tmp_path, idle_timeout_s=0.5)
        try:
            reply = await asyncio.to_thread(raw_exchange, server.port, blob)
            # a client that sends its header and then nothing is dropped after the timeout
            with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as s:
                s.sendall(start)
                idle = await asyncio.to_thread(read_until_closed, s)
        finally:
            await server.shutdown()
        return reply, idle

    reply, idle = run(go())
    with mrd2.open_mrd2_reader(io.BytesIO(reply), max_field_bytes=1 << 24) as reader:
        assert reader.read_header() == mrd2.header_to_mrd2(header)
        out = list(reader.read_data())
    assert out[0] == mrd.StreamItem.ImageFloat(img)  # passed through unchanged
    assert isinstance(out[1], mrd.StreamItem.ImageFloat) and len(out) == 2
    saved = sorted(tmp_path.glob("*.h5"))[0]
    with ismrmrd.Dataset(str(saved), "dataset", create_if_needed=False) as ds:
        w = ds.read_waveform(0)
        assert w.waveform_id == 4 and w.scan_counter == 2
        assert np.array_equal(w.data, wav.data)
    assert idle.startswith(mrd2.MRD2_MAGIC)  # the header came back, then the stream stops
    reader = mrd2.open_mrd2_reader(io.BytesIO(idle), max_field_bytes=1 << 24)
    assert reader.read_header() == mrd2.header_to_mrd2(header)
    with pytest.raises(EOFError):
        list(reader.read_data())
