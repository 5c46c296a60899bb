"""``mrharmony recon``: reconstruct raw data into NIfTI (+ JSON sidecar, maps).

The input is any format :func:`mrharmony.formats.raw.load_raw` reads: ISMRMRD HDF5, MRD v2,
or a Siemens twix ``.dat`` with the ``.seq`` the scanner played (``--seq``).
"""

from __future__ import annotations

from pathlib import Path

import click

from mrharmony.errors import ReconError

__all__ = ["recon"]


def _map_path(out: Path, name: str) -> Path:
    text = out.name
    if text.endswith(".mrd"):
        return out.with_name(f"{text[:-len('.mrd')]}_{name}.mrd")
    stem = text[: -len(".nii.gz")] if text.endswith(".nii.gz") else text.rsplit(".nii", 1)[0]
    suffix = ".nii.gz" if text.endswith(".nii.gz") else ".nii"
    return out.with_name(f"{stem}_{name}{suffix}")


@click.command("recon")
@click.argument("raw", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "output", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Output NIfTI (.nii or .nii.gz; a .json sidecar is written beside it), "
                   "or MRD v2 images (.mrd).")
@click.option("--method", default="auto", show_default=True,
              type=click.Choice(["auto", "fft", "grappa", "sense", "cs", "tv", "nufft"]),
              help="Reconstruction method (EPI data: auto or fft).")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "numpy", "cupy", "bart"]),
              help="Array backend (auto: GPU when CuPy sees one).")
@click.option("--lamda", type=float, default=None,
              help="Regularisation weight, relative (sense: x ||A^H A||; cs, tv: x max|A^H y|; "
                   "grappa: kernel fit); default per method. Refused by methods without one.")
@click.option("--grappa-edge", "grappa_edge", default=None, type=click.Choice(["fit", "zero"]),
              help="GRAPPA at the matrix edge: fit (one-sided kernels, default) or zero "
                   "(interior kernels, zeros outside: noise as the g-factor map says, edge "
                   "signal biased low).")
@click.option("--max-iter", "max_iter", type=int, default=None,
              help="Iterations of sense, cs, tv (default per method).")
@click.option("--coil-combine", "coil_combine", default=None,
              type=click.Choice(["rss", "adaptive", "sense"]),
              help="Coil combination: root sum of squares, adaptive (Walsh maps, Roemer) or "
                   "sense (ESPIRiT maps, Roemer); default rss. Not for sense/cs/tv.")
@click.option("--filter", "kfilter", default=None,
              type=click.Choice(["none", "hamming", "hanning", "fermi"]),
              help="k-space apodisation filter applied in recon (default none).")
@click.option("--filter-radius", "filter_radius", type=float, default=None,
              help="Fermi filter radius, fraction of k_max (default 0.9).")
@click.option("--filter-width", "filter_width", type=float, default=None,
              help="Fermi filter transition width, fraction of k_max (default 0.05).")
@click.option("--partial-fourier-method", "partial_fourier_method", default=None,
              type=click.Choice(["zero", "pocs", "homodyne"]),
              help="Completion of one-sided (partial-Fourier) k-space (default pocs).")
@click.option("--intensity-normalization", "intensity_normalization", default=None,
              type=click.Choice(["none", "prescan", "max"]),
              help="prescan: receive-profile correction against a virtual body coil; max: "
                   "peak 1 (default none).")
@click.option("--maps", "maps", default=None, type=click.Choice(["t1", "t2", "adc", "dti"]),
              help="Also fit quantitative maps (written as OUT_<quantity>.nii.gz).")
@click.option("--seq", "seq", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The Pulseq file the scanner played (needed for a Siemens twix RAW).")
@click.option("--measurement", type=int, default=None,
              help="twix only: measurement of a multi-measurement file (default: last).")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="twix EPI only: the same EPI with phase encoding off (ghost correction).")
@click.option("--reference-seq", "reference_seq", default=None,
              type=click.Path(dir_okay=False, path_type=Path), help="The .seq of --reference.")
@click.option("--dataset", default="dataset", show_default=True, help="HDF5 dataset group.")
@click.option("--write-mrd", is_flag=True, help="Also append MRD images to the raw HDF5 file.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
def recon(raw: Path, output: Path, method: str, backend: str, lamda: float | None,
          grappa_edge: str | None, max_iter: int | None, coil_combine: str | None,
          kfilter: str | None,
          filter_radius: float | None, filter_width: float | None,
          partial_fourier_method: str | None, intensity_normalization: str | None,
          maps: str | None,
          seq: Path | None, measurement: int | None, reference: Path | None,
          reference_seq: Path | None, dataset: str, write_mrd: bool, force: bool) -> None:
    """Reconstruct RAW (ISMRMRD HDF5, MRD v2, or twix with --seq) into OUTPUT (NIfTI + JSON,
    or MRD v2 images)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from mrharmony.formats.raw import load_raw, read_raw, sniff_format
    from mrharmony.recon.output import write_mrd_images, write_nifti
    from mrharmony.recon.pipeline import reconstruct

    if output.exists() and not force:
        raise FileExistsError(f"{output}: exists (use --force to replace it)")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  transient=True) as progress:
        task = progress.add_task(f"reading {raw.name}", total=None)
        kind = sniff_format(raw)
        if kind != "twix" and (seq or reference or reference_seq or measurement is not None):
            raise ReconError(f"{raw}: --seq, --measurement and --reference are for Siemens "
                             f"twix input; this is {kind}")
        if kind == "ismrmrd":
            data = read_raw(raw, dataset=dataset)
        else:
            if write_mrd:
                raise ReconError(f"{raw}: --write-mrd appends to an ISMRMRD HDF5 file, this is "
                                 f"{kind}")
            data = load_raw(raw, seq=seq, measurement=measurement, reference=reference,
                            reference_seq=reference_seq)
        progress.update(task, description=f"reconstructing ({method}, {backend})")
        given = (("lamda", lamda), ("grappa_edge", grappa_edge), ("max_iter", max_iter),
                 ("coil_combine", coil_combine),
                 ("filter", kfilter), ("filter_radius", filter_radius),
                 ("filter_width", filter_width),
                 ("partial_fourier_method", partial_fourier_method),
                 ("intensity_normalization", intensity_normalization))
        options = {k: v for k, v in given if v is not None}
        images = reconstruct(data, method=method, backend=backend, maps=maps, **options)
        progress.update(task, description="writing")
        plain = [im for im in images if "map" not in im.meta]
        by_map: dict[str, list] = {}
        for im in images:
            if "map" in im.meta:
                by_map.setdefault(im.meta["map"], []).append(im)
        if maps is not None and not by_map:
            raise ReconError(f"maps {maps!r}: nothing was fitted")
        outputs = [(output, plain)] + [(_map_path(output, k), v) for k, v in by_map.items()]
        for path, _ in outputs:
            if path.exists() and not force:
                raise FileExistsError(f"{path}: exists (use --force to replace it)")
        written = []
        for path, group in outputs:
            if path.suffix == ".mrd":
                from mrharmony.formats.mrd2 import write_mrd2_images

                written.append(write_mrd2_images(path, group, header=data.header,
                                                 force=force))
            else:
                written += write_nifti(group, path, header=data.header, force=force)
        if write_mrd:
            write_mrd_images(plain, raw, dataset=dataset)
    for path in written:
        click.echo(str(path))
