"""``mrharmony harmonize train`` / ``apply`` with learned image models, through files."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import nibabel as nib  # noqa: E402
import pandas as pd  # noqa: E402

from mrharmony.cli import main  # noqa: E402


def _fake_dataset(root):
    """A two-site paired set without simulation: smooth blobs, site B = 0.6 x A^1.3."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for k in range(5):
        base = ndimage.gaussian_filter(rng.random((16, 16)), 2) * 10
        split = "train" if k < 3 else ("validation" if k == 3 else "test")
        for site, img in (("a", base), ("b", 0.6 * base ** 1.3)):
            rel = f"images/sub-{k}_{site}.nii.gz"
            nib.save(nib.Nifti1Image(img[..., None].astype(np.float32), np.eye(4)), root / rel)
            rows.append({"subject": f"sub-{k}", "site": site, "contrast": "t1w", "slice": 0,
                         "split": split, "path": rel})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def test_train_and_apply_round_trip_through_files(tmp_path, capsys):
    torch.set_num_threads(1)
    data = _fake_dataset(tmp_path / "data")
    model = tmp_path / "model"
    assert main(["harmonize", "train", "deepharmony", str(data), "-o", str(model), "--quick",
                 "--epochs", "3", "--target-site", "a"]) == 0
    assert {p.name for p in model.iterdir()} == {"config.json", "weights.safetensors",
                                                 "training_loss.png"}
    config = json.loads((model / "config.json").read_text())
    assert config["method"] == "deepharmony" and config["state"]["target_site"] == "a"
    assert len(config["training"]["train_loss"]) == 3
    src = data / "images" / "sub-4_b.nii.gz"
    out = tmp_path / "h.nii.gz"
    assert main(["harmonize", "apply", str(model), str(src), "-o", str(out), "--site", "b"]) == 0
    from mrharmony.harmonize.learned.base import load_harmonizer

    expected = load_harmonizer(model, device="cpu").transform_volume(
        np.asarray(nib.load(src).dataobj), "b")
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), expected)
    # several inputs -> a folder
    assert main(["harmonize", "apply", str(model), str(src), str(data / "images/sub-3_b.nii.gz"),
                 "-o", str(tmp_path / "many"), "--site", "b"]) == 0
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["sub-3_b.nii.gz",
                                                                      "sub-4_b.nii.gz"]


@pytest.mark.parametrize(("args", "message"), [
    (["train", "nonsense", "{data}", "-o", "{tmp}/m"], "unknown learned method 'nonsense'"),
    (["train", "deepharmony", "{data}/manifest.csv", "-o", "{tmp}/m"],
     "deepharmony is an image method; DATA must be a dataset folder"),
    (["train", "deepharmony", "{data}", "-o", "{tmp}/m", "--target-site", "zz"],
     "target site 'zz' not in the data"),
    (["apply", "{model}", "{data}/images/sub-4_b.nii.gz", "-o", "{tmp}/x.nii.gz"],
     "an image model needs --site"),
    (["apply", "{model}", "{data}/images/sub-4_b.nii.gz", "-o", "{tmp}/x.nii.gz",
      "--site", "zz"], "site 'zz' was not in the training data"),
    (["apply", "{model}", "{data}/manifest.csv", "-o", "{tmp}/x.csv", "--site", "b"],
     "not a NIfTI image"),
    (["apply", "{tmp}", "{data}/manifest.csv", "-o", "{tmp}/x.csv"], "not a learned model"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    torch.set_num_threads(1)
    data = _fake_dataset(tmp_path / "data")
    model = tmp_path / "model"
    assert main(["harmonize", "train", "deepharmony", str(data), "-o", str(model),
                 "--quick", "--epochs", "1"]) == 0
    capsys.readouterr()
    fmt = {"data": data, "tmp": tmp_path, "model": model}
    assert main(["harmonize", *[a.format(**fmt) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mrharmony: error:") and message in err[0], err
    assert not (tmp_path / "m").exists() and not (tmp_path / "x.nii.gz").exists()
