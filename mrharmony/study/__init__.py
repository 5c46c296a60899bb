"""Multi-site reproducibility studies: the loop from protocols to a report, on Dask.

- :func:`load_study` / :class:`Study`: the study TOML, validated.
- :func:`run_study`: preflight, content-addressed tasks on a local or remote Dask
  cluster, features, harmonization, evaluation, BIDS-like tree and ``report.html``.
"""

from __future__ import annotations

from mrharmony.study.config import Study, load_study
from mrharmony.study.runner import StudyResult, run_study

__all__ = ["Study", "StudyResult", "load_study", "run_study"]
