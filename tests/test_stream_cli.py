"""`mrharmony serve`, `stream` and `scan` end to end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import ismrmrd
import nibabel as nib
import numpy as np
import pytest

from mrharmony.cli import main
from mrharmony.errors import StreamError
from mrharmony.formats.raw import read_raw
from mrharmony.recon.pipeline import reconstruct
from mrharmony.recon.stream.scanner import synthetic_cartesian_scan
from mrharmony.recon.stream.server import ServerSettings, StreamServer
from mrharmony.recon.stream_cli import parse_host_port

TIMEOUT_S = 60.0  # guard against hangs only


class BackgroundServer:
    """A StreamServer on its own event loop in a thread (the CLIs run asyncio.run)."""

    def __init__(self, **kw) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.settings = ServerSettings(port=0, executor="thread", **kw)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main_() -> None:
            self.server = await StreamServer(self.settings).start()
            self.stop = asyncio.Event()
            self.ready.set()
            await self.server.serve_until(self.stop)

        self.loop.run_until_complete(main_())
        self.loop.close()

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        assert self.ready.wait(TIMEOUT_S)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(TIMEOUT_S)


def write_scan(path: Path, **kw) -> Path:
    header, acqs = synthetic_cartesian_scan(**kw)
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=True) as ds:
        ds.write_xml_header(ismrmrd.xsd.ToXML(header))
        for a in acqs:
            ds.append_acquisition(a)
    return path


def test_stream_cli_writes_the_offline_result_as_nifti(tmp_path, capsys):
    raw = write_scan(tmp_path / "scan.h5", nx=32, ny=32, n_coils=2, n_slices=3, seed=21)
    with BackgroundServer() as bg:
        args = ["stream", str(raw), "--port", str(bg.server.port), "-o", str(tmp_path / "out")]
        assert main(args) == 0
        assert main(args) == 2  # refuses to overwrite without --force
        assert "exists" in capsys.readouterr().err
        assert main([*args, "--force"]) == 0
        chain = tmp_path / "chain.xml"  # sent as CONFIG_TEXT
        chain.write_text('<configuration><property name="method" value="fft"/></configuration>')
        assert main(["stream", str(raw), "--port", str(bg.server.port), "--config-file",
                     str(chain), "-o", str(tmp_path / "out2")]) == 0
    np.testing.assert_array_equal(nib.load(tmp_path / "out2" / "scan.nii.gz").dataobj,
                                  nib.load(tmp_path / "out" / "scan.nii.gz").dataobj)
    nii = nib.load(tmp_path / "out" / "scan.nii.gz")
    offline = reconstruct(read_raw(raw), backend="numpy")
    ref = np.concatenate([np.asarray(r.data) for r in sorted(offline, key=lambda r: r.slice)],
                         axis=2)
    got = np.asarray(nii.dataobj)
    assert got.shape == (32, 32, 3)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-6  # float32 round-off
    sidecar = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert sidecar["ReconstructionSettings"]["method"] == "fft"
    assert sidecar["EchoTime"] == pytest.approx(4e-3)


def test_stream_cli_reports_connection_refused(tmp_path, capsys):
    raw = write_scan(tmp_path / "scan.h5", nx=16, ny=16, n_coils=1, n_slices=1)
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["stream", str(raw), "--port", str(port), "-o", str(tmp_path / "o")]) == 2
    assert "cannot connect" in capsys.readouterr().err


def test_parse_host_port():
    assert parse_host_port("example.org:9002") == ("example.org", 9002)
    assert parse_host_port("[::1]:9003") == ("::1", 9003)
    for bad in ("nohost", ":9002", "h:0", "h:x"):
        with pytest.raises(StreamError):
            parse_host_port(bad)


def test_serve_lists_pipelines(capsys):
    assert main(["serve", "--list-pipelines"]) == 0
    out = capsys.readouterr().out
    assert "default.xml" in out and "mrharmony_sense.xml" in out


def test_serve_exits_cleanly_on_sigterm(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mrharmony", "serve", "--port", "0", "--executor", "thread",
         "--workers", "1"], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        line = ""
        while "mrharmony serve: listening on" not in line:
            line = proc.stderr.readline()
            assert line, "server exited before listening"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "shutdown complete" in err


def _tiny_seq_and_phantom(tmp_path: Path) -> tuple[Path, Path]:
    from mrharmony.phantoms import Phantom
    from mrharmony.sequences import build, write_seq
    from mrharmony.sequences.protocol import protocol_from_mapping
    from mrharmony.simulation import load_site

    n, fov = 16, 200.0
    proto = protocol_from_mapping({
        "builder": "gre2d", "name": "gre-stream", "fov_mm": [fov, fov], "matrix": [n, n],
        "slice_thickness_mm": 5, "te_ms": 5, "tr_ms": 12, "flip_deg": 15,
        "readout_bandwidth_hz_per_px": 260, "dummy_scans": 0})
    site = load_site("siemens-prisma-3t")
    seq = write_seq(build(proto, site.profile), tmp_path / "gre.seq")
    pd = np.zeros((n, n, 1), np.float32)
    pd[4:12, 5:11] = 1.0
    obj = pd > 0
    affine = np.diag([fov / n, fov / n, 5.0, 1.0])
    affine[:3, 3] = [-fov / 2, -fov / 2, 0.0]
    zero = np.zeros_like(pd)
    phantom = Phantom(pd=pd, t1_ms=np.where(obj, 800.0, 1.0), t2_ms=np.where(obj, 80.0, 1.0),
                      t2star_ms=np.where(obj, 60.0, 1.0), adc_mm2_s=zero, b0_hz=zero,
                      labels=obj.astype(np.int16), label_names={1: "object"}, affine=affine,
                      field_t=3.0, name="block")
    return seq, phantom.save(tmp_path / "phantom")


def test_scan_streams_a_simulated_acquisition(tmp_path):
    seq, phantom_dir = _tiny_seq_and_phantom(tmp_path)
    with BackgroundServer() as bg:
        assert main(["scan", str(seq), str(phantom_dir), "--site", "siemens-prisma-3t",
                     "--stream", f"127.0.0.1:{bg.server.port}", "--realtime", "--speed", "50",
                     "--keep-raw", str(tmp_path / "scan.h5"), "-o", str(tmp_path / "out")]) == 0
    got = np.asarray(nib.load(tmp_path / "out" / "gre.nii.gz").dataobj)
    offline = reconstruct(read_raw(tmp_path / "scan.h5"), backend="numpy")
    ref = np.asarray(offline[0].data)[..., 0]
    assert np.linalg.norm(got[..., 0] - ref) / np.linalg.norm(ref) < 1e-6


def test_write_stream_outputs_splits_image_series(tmp_path):
    from mrharmony.recon.stream.client import write_stream_outputs

    images = []
    for series in (0, 1):
        for s in range(2):
            img = ismrmrd.Image.from_array(np.full((1, 1, 4, 6), 1.0 + s, np.float32))
            img.image_series_index = series
            img.slice = s
            img.position = (0.0, 0.0, 5.0 * s)
            img.field_of_view = (60.0, 40.0, 5.0)
            img.read_dir, img.phase_dir, img.slice_dir = (1, 0, 0), (0, 1, 0), (0, 0, 1)
            images.append(img)
    paths = write_stream_outputs(images, tmp_path, "gt")
    assert sorted(p.name for p in paths) == ["gt_series0.json", "gt_series0.nii.gz",
                                             "gt_series1.json", "gt_series1.nii.gz"]
    vol = nib.load(tmp_path / "gt_series1.nii.gz")
    assert vol.shape == (6, 4, 2)  # MRD (channels, z, y, x) -> NIfTI (x, y, z)
    np.testing.assert_allclose(vol.header.get_zooms(), (10.0, 10.0, 5.0))
    with pytest.raises(StreamError, match="no images"):
        write_stream_outputs([], tmp_path, "none")
