"""A minimal feature harmonizer (per-site location), the baseline of the evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mrharmony.errors import HarmonizeError

from ._inputs import _frame, _labels

__all__ = ["MeanCentering"]


class MeanCentering:
    """Remove per-site means (add back the grand mean). ``fit/transform`` like ComBat."""

    def fit(self, X: Any, batch: Any, covariates: Any = None) -> MeanCentering:
        """Learn per-site feature means on (X, batch); covariates are ignored."""
        df = _frame(X)
        b = _labels(batch, len(df))
        self.columns_ = list(df.columns)
        self.grand_mean_ = df.mean(axis=0).to_numpy()
        self.site_means_ = {s: df.to_numpy()[b == s].mean(axis=0) for s in pd.unique(b)}
        return self

    def transform(self, X: Any, batch: Any, covariates: Any = None) -> pd.DataFrame:
        """Subtract each sample's site mean and add the grand mean."""
        df = _frame(X)
        b = _labels(batch, len(df))
        unknown = sorted(set(pd.unique(b)) - set(self.site_means_), key=str)
        if unknown:
            raise HarmonizeError(f"batch: sites {unknown} were not seen in fit")
        shift = np.stack([self.site_means_[s] for s in b]) - self.grand_mean_
        return pd.DataFrame(df.to_numpy() - shift, index=df.index, columns=df.columns)
