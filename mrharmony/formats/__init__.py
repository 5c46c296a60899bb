"""File formats: the one home of every raw-data and image format the toolkit reads or writes.

Below every stage (sequences, phantoms, simulation, recon and harmonize all import from
here; this package imports only the core):

- :mod:`.flags` — ISMRMRD/MRD acquisition flag bits and the Pulseq label → counter map;
- :mod:`.header` — the one strict XML header parser (no DTDs or entities, any encoding);
- :mod:`.raw` — ISMRMRD HDF5 raw data: :class:`~.raw.RawData`, the reader, the writer,
  the acquisition table, the streaming writer, and :func:`~.raw.load_raw` for every format;
- :mod:`.mrd2` — MRD v2 raw and image files (``mrd-python``);
- :mod:`.twix` — Siemens twix + Pulseq ``.seq`` → raw data;
- :mod:`.nifti` — the one NIfTI writer;
- :mod:`.pulseq` (+ :mod:`.pulseq_parse`) — the Pulseq reader (v1.2–1.5.1).

Submodules are imported on use, so ``import mrharmony.formats`` is cheap.
"""
