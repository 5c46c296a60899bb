"""Slice assembly: acquisitions are collected until their slice is complete.

:class:`SliceAssembler` groups acquisitions by ``(slice, repetition)`` and completes a
group on ``ACQ_LAST_IN_SLICE`` (everything on ``ACQ_LAST_IN_MEASUREMENT``), with the noise
scans received so far first in every group (they prewhiten it). Used by the server (on
the wire bytes' fields) and the Gadgetron gadget (on acquisitions).
"""

from __future__ import annotations

from typing import Any

from mrharmony.formats.flags import flag_mask

__all__ = ["SliceAssembler"]

_LAST_IN_SLICE = int(flag_mask("LAST_IN_SLICE"))
_NOISE = int(flag_mask("IS_NOISE_MEASUREMENT"))
_LAST_IN_MEASUREMENT = int(flag_mask("LAST_IN_MEASUREMENT"))


class SliceAssembler:
    """Collect acquisitions until a slice is complete.

    A slice ``(slice, repetition)`` is complete when an acquisition of it carries
    ``ACQ_LAST_IN_SLICE``; ``ACQ_LAST_IN_MEASUREMENT`` completes everything. Noise
    scans are kept and prepended to every completed group (they prewhiten it), so a
    slice reconstructed here equals the same slice of the offline reconstruction.
    """

    def __init__(self) -> None:
        self.noise: list[Any] = []
        self._pending: dict[tuple[int, int], list[Any]] = {}
        self._done: set[tuple[int, int]] = set()
        self.reopened: list[tuple[int, int]] = []

    def add(self, acq: Any, item: Any = None) -> list[list[Any]]:
        """Add one acquisition; return the groups it completes (noise first in each).

        Parameters
        ----------
        acq : ismrmrd.Acquisition
            Its flags and counters decide the grouping.
        item : Any, optional
            What to store and return for it (default: ``acq`` itself), e.g. a pair of
            the acquisition and its wire bytes.
        """
        item = acq if item is None else item
        return self.add_key(int(acq.flags), int(acq.idx.slice), int(acq.idx.repetition), item)

    def add_key(self, flags: int, slice_: int, repetition: int, item: Any) -> list[list[Any]]:
        """:meth:`add` from the fields that decide the grouping (a server that keeps only
        the wire bytes of an acquisition reads them from its header with ``struct``).

        Parameters
        ----------
        flags : int
            ``AcquisitionHeader.flags``.
        slice_, repetition : int
            ``idx.slice`` and ``idx.repetition``.
        item : Any
            What to store and return.
        """
        if flags & _NOISE:
            self.noise.append(item)
            return []
        key = (slice_, repetition)
        if key in self._done and key not in self._pending:
            self.reopened.append(key)  # more data after the slice was declared complete
        self._pending.setdefault(key, []).append(item)
        if flags & _LAST_IN_MEASUREMENT:
            return self.flush()
        if flags & _LAST_IN_SLICE:
            self._done.add(key)
            return [self.noise + self._pending.pop(key)]
        return []

    def flush(self) -> list[list[Any]]:
        """Return every incomplete group (at the end of the stream)."""
        groups = [self.noise + self._pending[k] for k in sorted(self._pending)]
        self._done.update(self._pending)
        self._pending.clear()
        return groups

    @property
    def pending_acquisitions(self) -> int:
        """Acquisitions waiting for their slice to complete."""
        return sum(len(v) for v in self._pending.values())
