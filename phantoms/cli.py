"""``mrharmony phantom``: make, inspect and build cohorts of numerical phantoms.

\b
mrharmony phantom make system --field-t 3 --matrix 128 -o out/system
mrharmony phantom make brain --field-t 1.5 --matrix 96 --3d -o out/brain
mrharmony phantom cohort --n 40 --seed 1 -o out/cohort
mrharmony phantom show out/system -o system.png
"""

from __future__ import annotations

from pathlib import Path

import click

from mrharmony.config import load_toml
from mrharmony.errors import PhantomError

__all__ = ["phantom"]

KINDS = ("system", "diffusion", "brain", "shepp-logan")


@click.group()
def phantom() -> None:
    """Numerical phantoms (NIST system/diffusion, MNI brain, Shepp-Logan) and cohorts."""


@phantom.command("make")
@click.argument("kind", type=click.Choice(KINDS))
@click.option("--field-t", type=float, default=3.0, show_default=True,
              help="Field strength (T) of the relaxation values.")
@click.option("--matrix", type=int, default=None,
              help="Voxels per axis (default 128; brain: native 1 mm grid).")
@click.option("--voxel-size-mm", type=float, default=None,
              help="brain only: isotropic voxel size over the template box (mm).")
@click.option("--slice", "slice_index", type=int, default=None,
              help="2-D: slice index of the 3-D grid (default: the phantom's own slice).")
@click.option("--3d", "three_d", is_flag=True, help="Make the full 3-D volume.")
@click.option("--array", type=click.Choice(["t1", "t2"]), default="t1", show_default=True,
              help="system only: plate of the default 2-D slice.")
@click.option("--temperature-c", type=float, default=0.0, show_default=True,
              help="diffusion only: phantom temperature (C).")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Output phantom directory.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def make(kind: str, field_t: float, matrix: int | None, voxel_size_mm: float | None,
         slice_index: int | None, three_d: bool, array: str, temperature_c: float,
         out_dir: Path, force: bool) -> None:
    """Make a phantom of KIND and save it as NIfTI maps + phantom.json."""
    from mrharmony.phantoms import (
        make_brain_phantom,
        make_diffusion_phantom,
        make_shepp_logan,
        make_system_phantom,
    )

    if three_d and slice_index is not None:
        raise PhantomError("give --slice or --3d, not both")
    if voxel_size_mm is not None and kind != "brain":
        raise PhantomError("--voxel-size-mm applies to the brain phantom only")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise PhantomError(f"{out_dir}: exists and is not empty (use --force to replace it)")
    n = 128 if matrix is None else matrix
    if kind == "system":
        ph = make_system_phantom(field_t, matrix=n, array=array, slice_index=slice_index,
                                 three_d=three_d)
    elif kind == "diffusion":
        ph = make_diffusion_phantom(matrix=n, temperature_c=temperature_c, field_t=field_t,
                                    slice_index=slice_index, three_d=three_d)
    elif kind == "shepp-logan":
        ph = make_shepp_logan(field_t, matrix=n, slice_index=slice_index, three_d=three_d)
    else:
        ph = make_brain_phantom(field_t, matrix=matrix, voxel_size_mm=voxel_size_mm,
                                slice_index=slice_index, three_d=three_d)
    path = ph.save(out_dir, force=force)
    vox = ", ".join(f"{v:.3g}" for v in ph.voxel_size_mm)
    click.echo(f"wrote {path} ({kind}, {ph.field_t:g} T, matrix {ph.shape}, voxel {vox} mm)")


@phantom.command("cohort")
@click.option("--n", "n_subjects", type=int, required=True, help="Number of subjects.")
@click.option("--seed", type=int, required=True, help="Random seed (same seed, same cohort).")
@click.option("--field-t", type=float, default=3.0, show_default=True,
              help="Field (T) of the subject phantoms.")
@click.option("--voxel-size-mm", type=float, default=2.0, show_default=True,
              help="Isotropic voxel size of the subject phantoms (mm).")
@click.option("--age-min", type=float, default=20.0, show_default=True, help="Youngest age.")
@click.option("--age-max", type=float, default=80.0, show_default=True, help="Oldest age.")
@click.option("--effects", "effects_path", type=click.Path(path_type=Path), default=None,
              help="TOML file with effect sizes (keys of CohortEffects).")
@click.option("--no-phantoms", is_flag=True,
              help="Write only cohort.json and ground_truth.csv (no sub-XXX/ maps).")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Output directory.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def cohort(n_subjects: int, seed: int, field_t: float, voxel_size_mm: float, age_min: float,
           age_max: float, effects_path: Path | None, no_phantoms: bool, out_dir: Path,
           force: bool) -> None:
    """Make a virtual cohort with known biology.

    \b
    Writes DIR/cohort.json (seed, effects, covariates), DIR/ground_truth.csv (one row per
    subject: realised GM/WM/CSF volumes, regional GM volume, tissue and regional T1/T2)
    and, unless --no-phantoms, one phantom directory DIR/sub-XXX per subject.
    """
    from mrharmony.phantoms.cohort import make_cohort

    effects = None
    if effects_path is not None:
        effects = load_toml(effects_path, error=PhantomError)
    c = make_cohort(n_subjects, seed, age_range=(age_min, age_max), effects=effects,
                    voxel_size_mm=voxel_size_mm)
    path = c.write(out_dir, field_t=field_t, phantoms=not no_phantoms, force=force,
                   progress=True)
    click.echo(f"wrote {path} ({n_subjects} subjects, seed {seed})")


@phantom.command("show")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_png", type=click.Path(path_type=Path), required=True,
              help="Output PNG.")
@click.option("--slice", "slice_index", type=int, default=None,
              help="Slice index (default: middle slice).")
@click.option("--force", is_flag=True, help="Overwrite an existing PNG.")
def show(directory: Path, out_png: Path, slice_index: int | None, force: bool) -> None:
    """Plot the maps of the phantom in DIRECTORY side by side into a PNG."""
    from mrharmony.phantoms.phantom import load_phantom
    from mrharmony.phantoms.plot import plot_phantom

    ph = load_phantom(directory)
    path = plot_phantom(ph, out_png, slice_index=slice_index, force=force)
    click.echo(f"wrote {path}")
