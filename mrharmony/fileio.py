"""Atomic file and directory writes: a reader sees the old content or the new, never half.

Every writer in the project goes through these two context managers. The new content is
written to a temporary path in the target's own folder (same file system), and renamed
over the target only when the block finishes without an exception; on an exception the
temporary is removed and the target is left as it was.

>>> from pathlib import Path
>>> import tempfile
>>> target = Path(tempfile.mkdtemp()) / "table.csv"
>>> with atomic_path(target) as tmp:
...     _ = tmp.write_text("a,b\\n1,2\\n")
>>> target.read_text()
'a,b\\n1,2\\n'
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path that replaces ``path`` when the block succeeds.

    Parameters
    ----------
    path : path
        The target file. Its folder must exist.
    suffix : str
        Suffix of the temporary file, for writers that infer the format from the name
        (``".png"`` for matplotlib, ``".nii.gz"`` for nibabel).

    Yields
    ------
    Path
        An empty temporary file beside ``path``; write the new content there.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder that replaces the folder ``path`` when the block succeeds.

    An existing ``path`` is moved aside and deleted only after the new folder is in
    place; on an exception the temporary folder is deleted and ``path`` is untouched.

    Parameters
    ----------
    path : path
        The target folder. Its parent must exist.

    Yields
    ------
    Path
        An empty temporary folder beside ``path``.
    """
    out = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
