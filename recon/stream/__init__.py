"""Online reconstruction over the MRD (Gadgetron/ISMRMRD) streaming protocol, v1 messages
or an MRD v2 (yardl) stream.

* :mod:`.protocol` — message reading/writing on asyncio streams with limits;
* :mod:`.server` — ``mrharmony serve``: slice-by-slice reconstruction server (settings,
  listening, fair scheduling over the worker pool), built from :mod:`.session` (one
  connection), :mod:`.assembly` (slices), :mod:`.pipelines` (config → reconstruction),
  :mod:`.jobs` (what runs in the pool) and :mod:`.rawsave` (``--save-raw``);
* :mod:`.client` — ``mrharmony stream``: send a file, receive images (also to Gadgetron);
* :mod:`.gadget` — the reconstruction as a Gadgetron external Python gadget;
* :mod:`.scanner` — ``mrharmony scan``: a virtual scanner streaming simulated data.

See ``docs/streaming.md``.
"""
