"""``mrharmony harmonize train`` and the learned-model half of ``harmonize apply``.

Image methods (``deepharmony``, ``mispel``, ``cyclegan``, ``calamiti``) train on a dataset
folder (``mrharmony harmonize dataset``); feature methods (``deepcombat``,
``deepresbat``) on a CSV feature table. A model is a folder (``weights.safetensors`` +
``config.json``, :mod:`mrharmony.harmonize.learned.model_file`) with the loss curves in
``training_loss.png``. Nothing here imports torch at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np

from mrharmony.errors import HarmonizeError
from mrharmony.harmonize.cli import read_table, split_names
from mrharmony.harmonize.registry import HARMONIZERS, learned_harmonizers

__all__ = ["apply_learned", "plot_losses", "train"]


def plot_losses(training: dict[str, Any], path: Path, title: str) -> Path:
    """Write the training and validation loss curves of a training record (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = training.get("train_loss") or []
    val = training.get("val_loss") or []
    ax.plot(range(1, len(train) + 1), train, label="training")
    if val:
        ax.plot(range(1, len(val) + 1), val, label="validation")
    best = training.get("best_epoch", -1)
    if isinstance(best, int) and best >= 0 and val:
        ax.axvline(best + 1, color="grey", ls=":", label="kept")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _options(cls: Any, quick: bool, epochs: int | None, seed: int, device: str,
             extra: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = dict(getattr(cls, "QUICK", {}) if quick else {})
    if epochs is not None:
        opts["epochs"] = epochs
    opts.update({k: v for k, v in extra.items() if v is not None})
    opts["seed"] = seed
    opts["device"] = device
    return opts


@click.command("train")
@click.argument("method", type=str)
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Model folder to write.")
@click.option("--quick", is_flag=True, help="The method's small configuration (minutes).")
@click.option("--epochs", type=int, default=None, help="Maximum epochs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda:N.")
@click.option("--target-site", default=None, help="Image methods: the site to harmonize to "
              "(default: the dataset's first site).")
@click.option("--contrast", default=None, help="Image methods: the contrast (default t1w).")
@click.option("--batch", "batch_col", default="site", show_default=True,
              help="Feature methods: the batch (site) column.")
@click.option("--covariates", default="", help="Feature methods: covariates to preserve.")
@click.option("--features", default="", help="Feature methods: feature columns "
              "(default: every other numeric column).")
@click.option("--force", is_flag=True, help="Replace an existing model folder.")
def train(method: str, data: Path, output: Path, quick: bool, epochs: int | None, seed: int,
          device: str, target_site: str | None, contrast: str | None, batch_col: str,
          covariates: str, features: str, force: bool) -> None:
    """Train learned harmonizer METHOD on DATA (a dataset folder or a feature CSV)."""
    from rich.console import Console

    from mrharmony.harmonize.learned import require_torch

    console = Console(stderr=True, highlight=False)
    spec = HARMONIZERS.get(method)
    if spec is None or not spec.learned:
        raise HarmonizeError(f"unknown learned method {method!r} (one of "
                             f"{', '.join(learned_harmonizers())})")
    if output.exists() and not force:
        raise FileExistsError(f"{output}: exists (use --force to replace it)")
    require_torch()
    cls = spec.load()
    if spec.level == "image":
        if not data.is_dir():
            raise HarmonizeError(f"{data}: {method} is an image method; DATA must be a "
                                 "dataset folder (mrharmony harmonize dataset)")
        from mrharmony.harmonize.learned.data import load_dataset

        dataset = load_dataset(data)
        if target_site is not None and target_site not in dataset.sites:
            raise HarmonizeError(f"{method}: target site {target_site!r} not in the data "
                                 f"(sites: {', '.join(dataset.sites)})")
        opts = _options(cls, quick, epochs, seed, device,
                        {"target_site": target_site, "contrast": contrast})
        model = cls(**opts)
        console.print(f"training {method} on {len(dataset.table)} images of "
                      f"{len(dataset.sites)} sites ({data})")
        model.fit(dataset, progress=True)
    else:
        if not data.is_file() or data.suffix.lower() != ".csv":
            raise HarmonizeError(f"{data}: {method} is a feature method; DATA must be a "
                                 "CSV feature table")
        from mrharmony.harmonize.cli_combat import _feature_columns, _labels, _require
        from mrharmony.harmonize.registry import make_harmonizer

        table = read_table(data, text_columns=[batch_col])
        cov_cols = split_names(covariates)
        _require(table, [batch_col, *cov_cols], data, "batch/covariate")
        ids = [c for c in ("subject",) if c in table.columns]
        feats = _feature_columns(table, [batch_col, *cov_cols, *ids], split_names(features),
                                 data)
        batch = _labels(table, batch_col, data, "batch")
        opts = _options(cls, quick, epochs, seed, device, {})
        model = make_harmonizer(method, **opts)
        console.print(f"training {method} on {len(table)} scans x {len(feats)} features")
        model.fit(table[feats], batch, table[cov_cols] if cov_cols else None)
        model.training_ = {**(model.training_ or {}), "columns": {
            "batch_column": batch_col, "covariate_columns": cov_cols,
            "feature_columns": feats}}
    model.save(output, force=force)
    png = plot_losses(model.training_ or {}, output / "training_loss.png", method)
    t = model.training_ or {}
    console.print(f"wrote {output} ({t.get('epochs_run', len(t.get('train_loss', [])))} "
                  f"epochs, stopped: {t.get('stopped', t.get('step2', {}).get('stopped', '-'))}"
                  f"); loss curves {png.name}")


def apply_learned(model_path: Path, inputs: tuple[Path, ...], output: Path,
                  site: str | None, target: str | None, force: bool) -> None:
    """Apply a learned model folder: NIfTI images (image models) or a CSV (feature models).

    Raises
    ------
    HarmonizeError
        Missing extra, wrong input kind, a missing ``--site`` for an image model, a
        site the model does not know.
    """
    from rich.console import Console

    from mrharmony.harmonize.learned.base import load_harmonizer
    from mrharmony.harmonize.learned.model_file import read_config

    console = Console(stderr=True, highlight=False)
    config = read_config(model_path)
    spec = HARMONIZERS.get(config["method"])
    if spec is None or not spec.learned:
        raise HarmonizeError(f"{model_path}: unknown learned method {config['method']!r}")
    if not inputs:
        raise HarmonizeError("apply: give the images or the feature table to harmonize")
    if spec.level == "features":
        if len(inputs) != 1 or inputs[0].suffix.lower() != ".csv":
            raise HarmonizeError(f"{model_path}: a {spec.name} model harmonizes one CSV "
                                 "feature table")
        from mrharmony.harmonize.cli_combat import (
            _check_numeric,
            _labels,
            _require,
            _write_table,
        )

        if output.exists() and not force:
            raise FileExistsError(f"{output}: exists (use --force to replace it)")
        cols = config["training"].get("columns")
        if not cols:
            raise HarmonizeError(f"{model_path}: no column names stored (train it with "
                                 "`mrharmony harmonize train`)")
        model = load_harmonizer(model_path, device="auto")
        table = read_table(inputs[0], text_columns=[cols["batch_column"]])
        cov_cols, feats = cols["covariate_columns"], cols["feature_columns"]
        _require(table, [cols["batch_column"], *cov_cols, *feats], inputs[0], "model")
        _check_numeric(table, feats, inputs[0])
        batch = _labels(table, cols["batch_column"], inputs[0], "batch")
        harmonized = model.transform(table[feats], batch,
                                     table[cov_cols] if cov_cols else None)
        out = table.copy()
        out[feats] = np.asarray(harmonized)
        _write_table(out, output, force)
        console.print(f"wrote {output}: {len(table)} scans harmonized with {model_path}")
        return
    import nibabel as nib

    from mrharmony.formats.nifti import save_nifti

    if site is None:
        raise HarmonizeError(f"{model_path}: an image model needs --site (the site the "
                             f"images come from; one of "
                             f"{', '.join(config['state'].get('sites', []))})")
    bad = [str(p) for p in inputs if not str(p).endswith((".nii", ".nii.gz"))]
    if bad:
        raise HarmonizeError(f"{bad[0]}: not a NIfTI image (.nii/.nii.gz)")
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such image")
    single = len(inputs) == 1 and str(output).endswith((".nii", ".nii.gz"))
    targets = [output] if single else [output / p.name for p in inputs]
    if not single and output.exists() and not output.is_dir():
        raise HarmonizeError(f"{output}: not a folder (several inputs need a folder)")
    for t in targets:
        if t.exists() and not force:
            raise FileExistsError(f"{t}: exists (use --force to replace it)")
    model = load_harmonizer(model_path, device="auto")
    model._check_site(site)
    results = []
    for p in inputs:
        img = nib.load(p)
        data = np.abs(np.asarray(img.dataobj, dtype=np.float32))
        results.append(nib.Nifti1Image(model.transform_volume(data, site, target=target),
                                       img.affine, img.header))
    if not single:
        output.mkdir(parents=True, exist_ok=True)
    for t, img in zip(targets, results, strict=True):
        save_nifti(img, t, force=True)
    console.print(f"wrote {len(targets)} image(s) harmonized from {site} to "
                  f"{target or model.target_site} with {model_path}")

