"""Bounded fuzzing of every reader that takes files from outside.

Each case applies seeded random mutations (truncation, deleted or duplicated lines, numbers
replaced by garbage, huge, negative or non-finite values, flipped bytes) to a valid input
and feeds the result to the reader. Every input must either work or raise the project's
named error (a :class:`~mrharmony.errors.MrHarmonyError`); any other exception is a bug
and fails the test with the seed that reproduces it. The number of mutations is fixed
(no wall-clock budget), so a run is deterministic.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mrharmony.errors import MrHarmonyError

N_CASES = 60  # mutations per input file
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "protocols"
CORPUS = ROOT.parent / "shared" / "pulseq-corpus"

_GARBAGE = ("", "nan", "inf", "-inf", "1e308", "-1", "0", "-99999999999", "x", "1.5.2",
            "999999999999999999999999", "'", "[", "#", "0x1F", "\x00", "é")


def mutate_text(text: str, rng: np.random.Generator) -> str:
    """One to three random, line- or token-level edits of a text file."""
    lines = text.splitlines(keepends=True)
    for _ in range(int(rng.integers(1, 4))):
        if not lines:
            break
        op = int(rng.integers(0, 6))
        i = int(rng.integers(0, len(lines)))
        if op == 0:  # truncate anywhere
            joined = "".join(lines)
            lines = [joined[: int(rng.integers(0, len(joined) + 1))]]
        elif op == 1:
            del lines[i]
        elif op == 2:
            lines.insert(i, lines[int(rng.integers(0, len(lines)))])
        elif op == 3:  # replace one token of a line
            tokens = re.split(r"(\s+)", lines[i])
            words = [k for k, t in enumerate(tokens) if t.strip()]
            if words:
                tokens[int(rng.choice(words))] = str(rng.choice(_GARBAGE))
                lines[i] = "".join(tokens)
        elif op == 4:  # scale a number
            lines[i] = re.sub(r"-?\d+(\.\d+)?", lambda m: str(float(m.group()) * float(
                rng.choice([-1.0, 0.0, 1e6, 1e-9, 2.0]))), lines[i], count=1)
        else:  # swap two lines
            j = int(rng.integers(0, len(lines)))
            lines[i], lines[j] = lines[j], lines[i]
    return "".join(lines)


def mutate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    """Truncate, or flip a few random bytes of, a binary file."""
    buf = bytearray(data)
    if rng.random() < 0.4:
        return bytes(buf[: int(rng.integers(0, len(buf)))])
    for _ in range(int(rng.integers(1, 9))):
        k = int(rng.integers(0, len(buf)))
        buf[k] = int(rng.integers(0, 256))
    return bytes(buf)


def run_case(fn, seed: int) -> None:
    try:
        fn()
    except MrHarmonyError:
        pass  # the named error: the reader refused the input, as it should
    except Exception as exc:
        pytest.fail(f"seed {seed}: {type(exc).__name__} escaped the reader: {exc}")


def _seq_sources(tmp_path_factory) -> list[Path]:
    from mrharmony.sequences import build_file

    out = tmp_path_factory.mktemp("fuzz-seq")
    files = [build_file(EXAMPLES / "gre2d.toml", "siemens-prisma", out / "gre2d.seq")[1]]
    if CORPUS.is_dir():
        files += sorted(p for p in CORPUS.glob("*.seq") if p.stat().st_size < 400_000)[:3]
    return files


@pytest.fixture(scope="module")
def seq_files(tmp_path_factory) -> list[Path]:
    return _seq_sources(tmp_path_factory)


def test_pulseq_reader_survives_mutations(seq_files, tmp_path):
    from mrharmony.formats.pulseq import read_pulseq

    for f, source in enumerate(seq_files):
        text = source.read_text(errors="replace")
        for case in range(N_CASES // len(seq_files) + 1):
            seed = 1000 * f + case
            bad = tmp_path / f"m{seed}.seq"
            bad.write_text(mutate_text(text, np.random.default_rng(seed)), errors="replace")

            def read(bad=bad) -> None:
                seq = read_pulseq(bad)
                seq.adc_records()
                seq.kspace_at_adc()

            run_case(read, seed)


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory) -> Path:
    """A small, valid ISMRMRD file from the one writer (2 coils, 8 x 8, 2 noise scans)."""
    import ismrmrd.xsd as mrd

    from mrharmony.formats.flags import flag_mask
    from mrharmony.formats.header import header_to_xml
    from mrharmony.formats.layout import layout_from_seq
    from mrharmony.formats.pulseq import read_pulseq
    from mrharmony.formats.raw import write_raw
    from mrharmony.sequences import build_file

    out = tmp_path_factory.mktemp("fuzz-raw")
    seq_path = build_file(EXAMPLES / "gre2d.toml", "siemens-prisma", out / "g.seq")[1]
    layout = layout_from_seq(read_pulseq(seq_path), n_coils=2)
    rng = np.random.default_rng(0)
    heads = layout.heads
    noise = heads[:2].copy()
    noise["flags"] = flag_mask("IS_NOISE_MEASUREMENT")
    heads = np.concatenate([noise, heads])
    data = [(rng.normal(size=(2, int(h["number_of_samples"])))
             + 1j * rng.normal(size=(2, int(h["number_of_samples"])))).astype(np.complex64)
            for h in heads]
    header = layout.header
    header.acquisitionSystemInformation.receiverChannels = 2
    assert isinstance(header, mrd.ismrmrdHeader)
    return write_raw(out / "raw.h5", header_to_xml(header), heads, data)


def test_ismrmrd_reader_and_recon_survive_corrupt_files(raw_file, tmp_path):
    from mrharmony.formats.raw import load_raw
    from mrharmony.recon.pipeline import reconstruct

    data = raw_file.read_bytes()
    for seed in range(N_CASES // 2):
        bad = tmp_path / f"b{seed}.h5"
        bad.write_bytes(mutate_bytes(data, np.random.default_rng(seed)))
        run_case(lambda bad=bad: reconstruct(load_raw(bad), method="fft"), seed)


def test_ismrmrd_reader_survives_bad_headers_and_fields(raw_file, tmp_path):
    import h5py

    from mrharmony.formats.raw import read_raw
    from mrharmony.recon.pipeline import reconstruct

    with h5py.File(raw_file, "r") as fh:
        xml = fh["dataset/xml"][0].decode()
        records = fh["dataset/data"][()]
    fields = ("number_of_samples", "active_channels", "trajectory_dimensions",
              "center_sample", "discard_pre", "discard_post", "encoding_space_ref")
    for seed in range(N_CASES):
        rng = np.random.default_rng(10_000 + seed)
        recs = records.copy()
        text = xml
        if seed % 2:
            text = mutate_text(xml.replace("><", ">\n<"), rng)
        else:
            name = str(rng.choice(fields))
            k = int(rng.integers(0, recs.size))
            head = recs["head"].copy()
            head[name][k] = int(rng.choice([0, 1, 3, 255, 65535]))
            recs["head"] = head
        bad = tmp_path / f"h{seed}.h5"
        with h5py.File(bad, "w") as fh:
            grp = fh.create_group("dataset")
            ds = grp.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
            ds[0] = text.encode("utf-8", errors="replace")
            grp.create_dataset("data", data=recs)
        run_case(lambda bad=bad: reconstruct(read_raw(bad), method="fft"), 10_000 + seed)


def test_model_file_reader_survives_corrupt_files(tmp_path):
    from mrharmony.harmonize import ComBat, load_model

    rng = np.random.default_rng(7)
    X = rng.normal(size=(40, 5)) + 10
    site = np.repeat(["a", "b"], 20)
    path = ComBat().fit(X, site).save(tmp_path / "m.model")
    data = path.read_bytes()
    for seed in range(N_CASES // 2):
        bad = tmp_path / f"m{seed}.model"
        bad.write_bytes(mutate_bytes(data, np.random.default_rng(seed)))
        run_case(lambda bad=bad: load_model(bad).transform(X, site), seed)


PROTOCOLS = sorted(p.name for p in EXAMPLES.glob("*.toml"))


@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_toml_survives_mutations(name, tmp_path):
    from mrharmony.sequences.protocol import load_protocol

    text = (EXAMPLES / name).read_text()
    for case in range(6):
        seed = 100 * PROTOCOLS.index(name) + case
        bad = tmp_path / f"p{case}.toml"
        bad.write_text(mutate_text(text, np.random.default_rng(seed)))
        run_case(lambda bad=bad: load_protocol(bad), seed)


def test_study_toml_survives_mutations(tmp_path):
    import shutil

    from mrharmony.study.config import load_study

    studies = tmp_path / "studies"
    shutil.copytree(ROOT / "examples" / "studies", studies)  # relative paths resolve here
    text = (studies / "vendor-agnostic-phantom.toml").read_text()
    for seed in range(N_CASES // 2):
        bad = studies / f"fuzz-{seed}.toml"
        bad.write_text(mutate_text(text, np.random.default_rng(seed)))
        run_case(lambda bad=bad: load_study(bad), seed)


def test_mutators_change_their_input():
    rng = np.random.default_rng(0)
    text = "a 1\nb 2\nc 3\n"
    assert any(mutate_text(text, rng) != text for _ in range(5))
    assert any(mutate_bytes(b"abcdefgh" * 8, rng) != b"abcdefgh" * 8 for _ in range(5))
