"""Learned feature-level harmonizers: DeepComBat and DeepResBat.

Both take the ComBat interface of :class:`~mrharmony.harmonize.combat.ComBat`:
``fit(X, batch, covariates)``, ``transform(X, batch, covariates)``, ``fit_transform``;
``X`` is a samples x features DataFrame or array, ``batch`` the site labels, and
``covariates`` a DataFrame encoded as ComBat encodes it
(:class:`~mrharmony.harmonize.combat_design.CovariateEncoder`: categorical columns one-hot
with the first sorted level dropped, numeric columns as they are). The ComBat steps are
the project's :class:`~mrharmony.harmonize.combat.ComBat` (empirical Bayes, parametric),
fitted on the training rows and applied to new rows of the same sites; a site not seen at
fit is refused with :class:`~mrharmony.errors.HarmonizeError`, as ComBat refuses it.

* :class:`DeepComBat` (Hu et al. 2023): features are standardised; a conditional VAE
  (encoder and decoder conditioned on the batch and the covariates) is trained with the
  authors' schedule (autoencoder pre-training, cyclic KL annealing, training at the final
  KL weight ``lambda = 0.1``); ComBat (with covariates) harmonizes the latent means; the
  decoder maps them back under the average batch code (or the reference batch); the
  autoencoder's residuals, harmonized by a second ComBat, are added back.
* :class:`DeepResBat` (An et al. 2024): a small MLP learns the covariate effects (jointly
  with nuisance batch offsets, so that the effect does not absorb site); the
  covariate-free residuals are harmonized by ComBat (location/scale per site, empirical
  Bayes); the learned covariate effects are added back.

Deviations from the papers are listed in ``docs/learned.md`` ("Feature-level"). This
module imports :mod:`torch` only inside methods; the networks live in
:mod:`._feature_nets`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from mrharmony.errors import HarmonizeError
from mrharmony.harmonize.combat import ComBat
from mrharmony.harmonize.combat_design import (
    CovariateEncoder,
    aligned,
    as_matrix,
    check_confounding,
    json_scalar,
)

from .base import LearnedHarmonizer, TrainingLog, run_epochs, seed_all
from .model_file import fingerprint

__all__ = ["DeepComBat", "DeepResBat"]


def _check_int(name: str, value: Any, low: int) -> int:
    out = int(value)
    if out < low:
        raise HarmonizeError(f"{name}: {value} < {low}")
    return out


def _split_rows(codes: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray,
                                                                        np.ndarray]:
    """Seeded validation split of the rows, stratified by batch.

    Each batch gives ``round(fraction * n_b)`` rows to validation (at most ``n_b - 1``,
    so every batch stays in training). Returns sorted (train, validation) row indices.
    """
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for b in np.unique(codes):
        rows = np.flatnonzero(codes == b)
        k = min(round(fraction * rows.size), rows.size - 1)
        if k > 0:
            val.append(rng.permutation(rows)[:k])
    val_rows = np.sort(np.concatenate(val)) if val else np.zeros(0, np.intp)
    train_rows = np.setdiff1d(np.arange(codes.size), val_rows)
    return train_rows, val_rows


def _combat_state(model: ComBat, prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A fitted ComBat as (JSON meta, prefixed arrays) for a learned model file."""
    meta, arrays = model._get_state()
    return meta, {f"{prefix}.{k}": np.asarray(v) for k, v in arrays.items()}


def _combat_from(meta: dict[str, Any], tensors: dict[str, Any], prefix: str) -> ComBat:
    head = prefix + "."
    arrays = {k[len(head):]: v.numpy() for k, v in tensors.items() if k.startswith(head)}
    return ComBat._from_state(meta, arrays)


class _FeatureHarmonizer(LearnedHarmonizer):
    """What DeepComBat and DeepResBat share: inputs, scaling, splits, the ComBat steps."""

    def __init__(self, *, categorical: Sequence[str] = (), ref_batch: Any = None,
                 val_fraction: float = 0.15, patience: int = 10, lr: float = 0.01,
                 batch_size: int = 64, seed: int = 0, device: str = "auto") -> None:
        super().__init__(seed=seed, device=device)
        self.categorical = [str(c) for c in categorical]
        self.ref_batch = ref_batch
        if not 0.0 <= float(val_fraction) < 0.5:
            raise HarmonizeError(f"val_fraction: {val_fraction} not in [0, 0.5)")
        self.val_fraction = float(val_fraction)
        self.patience = _check_int("patience", patience, 1)
        if not float(lr) > 0:
            raise HarmonizeError(f"lr: {lr} must be > 0")
        self.lr = float(lr)
        self.batch_size = _check_int("batch_size", batch_size, 1)

    def _options(self) -> dict[str, Any]:
        return {"seed": self.seed, "categorical": self.categorical,
                "ref_batch": json_scalar(self.ref_batch), "val_fraction": self.val_fraction,
                "patience": self.patience, "lr": self.lr, "batch_size": self.batch_size}

    def _combat(self) -> ComBat:
        return ComBat(categorical=self.categorical, ref_batch=self.ref_batch)

    # -- inputs -------------------------------------------------------------------------
    @staticmethod
    def _matrix(X: Any) -> tuple[np.ndarray, Any, Any]:
        Xm, index, columns = as_matrix(X)
        Xm = np.asarray(Xm, dtype=np.float64)  # a dask array is computed here
        if not np.isfinite(Xm).all():
            raise HarmonizeError(f"X: {int((~np.isfinite(Xm)).sum())} missing or infinite "
                                 "values; the learned harmonizers need complete rows")
        return Xm, index, columns

    def _fit_inputs(self, X: Any, batch: Any, covariates: Any) -> dict[str, Any]:
        """Check and encode the training inputs; sets the fitted input attributes."""
        Xm, index, columns = self._matrix(X)
        n, p = Xm.shape
        probe = self._combat()  # the one batch-label rule: ComBat's
        codes = probe._batch_codes(batch, n, fit=True)
        self.batches_ = list(probe.batches_)
        if len(self.batches_) < 2:
            raise HarmonizeError(f"batch: need at least 2 batches, got {self.batches_}")
        probe._ref_index()  # refuses a ref_batch that is not a level
        self.encoder_ = CovariateEncoder(categorical=self.categorical)
        cov = self.encoder_.fit(covariates, n)
        onehot = self._onehot(codes)
        check_confounding(onehot, cov, self.encoder_)
        if n <= onehot.shape[1] + cov.shape[1]:
            raise HarmonizeError(f"X: {n} samples for {onehot.shape[1] + cov.shape[1]} "
                                 "design columns (batches + covariate columns)")
        self.n_features_in_ = p
        self.feature_names_in_ = [str(c) for c in columns] if columns is not None else None
        self.x_mean_ = Xm.mean(axis=0)
        sd = Xm.std(axis=0, ddof=1) if n > 1 else np.ones(p)
        self.x_scale_ = np.where(sd > 0, sd, 1.0)
        self.cov_min_ = cov.min(axis=0) if cov.shape[1] else np.zeros(0)
        span = (cov.max(axis=0) - self.cov_min_) if cov.shape[1] else np.zeros(0)
        self.cov_span_ = np.where(span > 0, span, 1.0)
        return {"X": Xm, "index": index, "columns": columns, "codes": codes, "cov": cov,
                "n": n, "p": p}

    def _apply_inputs(self, X: Any, batch: Any, covariates: Any,
                      combat: ComBat) -> dict[str, Any]:
        """Check and encode new inputs against the fitted model (ComBat's checks)."""
        self._check_fitted()
        Xm, index, columns = self._matrix(X)
        combat._check_features(Xm, columns)
        n = Xm.shape[0]
        codes = self._codes(batch, n)
        cov = self.encoder_.transform(covariates, n)
        return {"X": Xm, "index": index, "columns": columns, "codes": codes, "cov": cov,
                "n": n, "p": Xm.shape[1]}

    def _codes(self, batch: Any, n: int) -> np.ndarray:
        """Codes of the fitted batch levels; a new site is refused."""
        values = np.asarray(batch.to_numpy() if isinstance(batch, pd.Series | pd.Index)
                            else batch, dtype=object).ravel()
        if values.shape[0] != n:
            raise HarmonizeError(f"batch: {values.shape[0]} labels for {n} samples")
        codes = np.asarray(pd.Categorical(values, categories=self.batches_).codes, np.intp)
        if (codes < 0).any():
            unknown = sorted({str(v) for v, c in zip(values, codes, strict=True) if c < 0})
            raise HarmonizeError(f"batch: unknown batch level(s) {unknown} (fitted: "
                                 f"{self.batches_}); a {self.method} model harmonizes only "
                                 "the sites it was trained on: retrain it with the new site")
        return codes

    def _labels(self, codes: np.ndarray) -> np.ndarray:
        """The batch labels of ``codes`` (what the ComBat steps are fitted on)."""
        return np.asarray(self.batches_, dtype=object)[codes]

    def _onehot(self, codes: np.ndarray) -> np.ndarray:
        return (codes[:, None] == np.arange(len(self.batches_))[None, :]).astype(np.float64)

    def _standardise(self, Xm: np.ndarray) -> np.ndarray:
        return (Xm - self.x_mean_) / self.x_scale_

    def _scaled_cov(self, cov: np.ndarray) -> np.ndarray:
        """Covariate design columns min-max scaled to [0, 1] on the training rows."""
        return (cov - self.cov_min_) / self.cov_span_

    def _frame(self, values: np.ndarray, inputs: dict[str, Any]) -> Any:
        """``values`` labelled like ``X`` (a DataFrame when ``X`` was one)."""
        if inputs["columns"] is not None:
            return pd.DataFrame(values, index=inputs["index"], columns=inputs["columns"])
        return values

    @staticmethod
    def _numpy(values: Any) -> np.ndarray:
        return np.asarray(values.to_numpy() if isinstance(values, pd.DataFrame) else values,
                          dtype=np.float64)

    def _tensor(self, values: np.ndarray) -> Any:
        import torch

        return torch.as_tensor(np.asarray(values, dtype=np.float32),
                               device=self.torch_device)

    def _minibatches(self, rows: np.ndarray, generator: Any) -> list[np.ndarray]:
        import torch

        order = rows[torch.randperm(rows.size, generator=generator).numpy()]
        return [order[s:s + self.batch_size] for s in range(0, order.size, self.batch_size)]

    def _record(self, inputs: dict[str, Any], covariates: Any, log: TrainingLog,
                rows: tuple[np.ndarray, np.ndarray], seconds: float) -> None:
        self.training_ = {
            "fingerprint": fingerprint(inputs["X"], self._labels(inputs["codes"]),
                                       inputs["cov"]),
            "seed": self.seed, "epochs": len(log.train_loss), "n_train": int(rows[0].size),
            "n_val": int(rows[1].size), "seconds": round(seconds, 3),
            "covariates": self.encoder_.names, **log.as_dict()}

    def _input_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        state = {"batches": self.batches_, "covariate_terms": self.encoder_.terms,
                 "feature_names": self.feature_names_in_, "n_features": self.n_features_in_}
        tensors = {"x_mean": self.x_mean_, "x_scale": self.x_scale_,
                   "cov_min": self.cov_min_, "cov_span": self.cov_span_}
        return state, tensors

    def _restore_inputs(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        self.batches_ = list(state["batches"])
        self.encoder_ = CovariateEncoder.from_terms(state["covariate_terms"])
        self.feature_names_in_ = state["feature_names"]
        self.n_features_in_ = int(state["n_features"])
        for key in ("x_mean", "x_scale", "cov_min", "cov_span"):
            setattr(self, f"{key}_", tensors[key].numpy().astype(np.float64))

    @aligned
    def fit_transform(self, X: Any, batch: Any, covariates: Any = None, *,
                      progress: bool = False) -> Any:
        """:meth:`fit` then :meth:`transform` on the same samples."""
        return self.fit(X, batch, covariates, progress=progress).transform(X, batch,
                                                                           covariates)


# --------------------------------------------------------------------------- DeepComBat


class DeepComBat(_FeatureHarmonizer):
    """DeepComBat (Hu et al. 2023): a conditional VAE with ComBat in its latent space.

    Training (standardised features, covariate design min-max scaled to [0, 1]):
    ``loss = sum_v (x_v - x_hat_v)^2 + beta * kl_weight * KL(q(z|x,b,c) || N(0, I))`` per
    sample, minibatches of ``batch_size``, Adam (``lr``). The KL weight ``beta`` follows the
    authors' schedule: ``pretrain_epochs`` at 0, ``anneal_epochs`` of cyclic annealing
    (0 -> 1 linearly over ``anneal_cycle`` epochs, held at 1 for a quarter cycle), then up
    to ``epochs`` at 1 with early stopping on the validation loss (the full loss, decoded
    from the latent mean, on a seeded ``val_fraction`` of the rows).

    Harmonization: latent means ``mu`` -> ComBat(``mu``, batch, covariates) = ``mu*``;
    ``y = D(mu*, b_target, c) + ComBat(x - D(mu, b, c), batch, covariates)`` (in feature
    units), with ``b_target`` the average batch code (``1/B`` per level) or the
    ``ref_batch`` one-hot.

    Parameters
    ----------
    latent_dim : int, optional
        Latent size; default ``2**round(log2(p / 4))`` (the authors' rule), at least 1 and
        less than the feature count.
    n_hidden : int
        Hidden layers of encoder and decoder (widths fall linearly, as the authors'). The
        authors' default is 3; 1 here (see ``docs/learned.md``: on tables of ~10 features
        three layers distorted the non-linear age effect).
    kl_weight : float
        Final KL weight ``lambda`` (the authors' default 0.1).
    pretrain_epochs, anneal_epochs : int
        Epochs without KL and of cyclic annealing (authors: 5 and 30).
    anneal_cycle : int
        Epochs per annealing cycle (authors: 5).
    epochs : int
        Maximum epochs at the final KL weight (early stopping; authors: 5, fixed).
    categorical, ref_batch, val_fraction, patience, lr, batch_size, seed, device
        Covariates to treat as categorical; the reference batch (returned unchanged);
        validation fraction; early-stopping patience (epochs); Adam learning rate
        (authors: 0.01); minibatch size (authors: 64); seed; torch device.
    """

    method: ClassVar[str] = "deepcombat"
    #: Constructor options of ``--quick``.
    QUICK: ClassVar[dict[str, Any]] = {"pretrain_epochs": 3, "anneal_epochs": 10,
                                       "epochs": 10}

    def __init__(self, *, latent_dim: int | None = None, n_hidden: int = 1,
                 kl_weight: float = 0.1, pretrain_epochs: int = 5, anneal_epochs: int = 30,
                 anneal_cycle: int = 5, epochs: int = 30, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.latent_dim = None if latent_dim is None else _check_int("latent_dim",
                                                                     latent_dim, 1)
        self.n_hidden = _check_int("n_hidden", n_hidden, 0)
        if not float(kl_weight) >= 0:
            raise HarmonizeError(f"kl_weight: {kl_weight} must be >= 0")
        self.kl_weight = float(kl_weight)
        self.pretrain_epochs = _check_int("pretrain_epochs", pretrain_epochs, 0)
        self.anneal_epochs = _check_int("anneal_epochs", anneal_epochs, 0)
        self.anneal_cycle = _check_int("anneal_cycle", anneal_cycle, 1)
        self.epochs = _check_int("epochs", epochs, 1)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "latent_dim": self.latent_dim,
                "n_hidden": self.n_hidden, "kl_weight": self.kl_weight,
                "pretrain_epochs": self.pretrain_epochs,
                "anneal_epochs": self.anneal_epochs, "anneal_cycle": self.anneal_cycle,
                "epochs": self.epochs}

    def _latent_size(self, p: int) -> int:
        if p < 2:
            raise HarmonizeError(f"X: {p} feature(s); DeepComBat needs at least 2 "
                                 "(the latent space is smaller than the features)")
        size = self.latent_dim or max(1, int(2 ** round(np.log2(p / 4))))
        if size >= p:
            if self.latent_dim is not None:
                raise HarmonizeError(f"latent_dim: {size} must be less than the {p} "
                                     "features")
            size = p - 1
        return size

    def _target_code(self, n: int) -> np.ndarray:
        B = len(self.batches_)
        if self.ref_batch is None:
            return np.full((n, B), 1.0 / B)
        code = np.zeros((n, B))
        code[:, self.batches_.index(json_scalar(self.ref_batch))] = 1.0
        return code

    @aligned
    def fit(self, X: Any, batch: Any, covariates: Any = None, *,
            progress: bool = False) -> DeepComBat:
        """Train the CVAE and fit the latent and residual ComBat models.

        Parameters
        ----------
        X : ndarray or DataFrame, shape (n_samples, n_features)
            Feature values (any unit; complete rows).
        batch : array-like, shape (n_samples,)
            Site label of each sample.
        covariates : DataFrame, optional
            Biological covariates to preserve (as for ComBat).
        progress : bool
            Show a progress bar.

        Returns
        -------
        DeepComBat
            ``self``.

        Raises
        ------
        HarmonizeError
            As :meth:`ComBat.fit`, missing values, fewer than 2 features, or divergence.
        """
        import torch

        from ._feature_nets import CVAE, kl_divergence, vae_dims

        t0 = time.perf_counter()
        inp = self._fit_inputs(X, batch, covariates)
        p = inp["p"]
        dims = vae_dims(p, self._latent_size(p), self.n_hidden)
        seed_all(self.seed)
        net = CVAE(dims, len(self.batches_), inp["cov"].shape[1]).to(self.torch_device)
        self.dims_ = dims
        x = self._tensor(self._standardise(inp["X"]))
        b = self._tensor(self._onehot(inp["codes"]))
        c = self._tensor(self._scaled_cov(inp["cov"]))
        train_rows, val_rows = _split_rows(inp["codes"], self.val_fraction, self.seed)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        steps_per_epoch = -(-train_rows.size // self.batch_size)
        cycle = steps_per_epoch * self.anneal_cycle
        hold = cycle // 4
        step = [0]

        def beta(epoch: int) -> float:
            if epoch < self.pretrain_epochs:
                return 0.0
            if epoch >= self.pretrain_epochs + self.anneal_epochs:
                return 1.0
            t = step[0] % (cycle + 1 + hold)
            step[0] += 1
            return min(t, cycle) / cycle

        def train_epoch(epoch: int) -> float:
            total = 0.0
            for rows in self._minibatches(train_rows, gen):
                idx = torch.as_tensor(rows, device=x.device)
                xb, bb, cb = x[idx], b[idx], c[idx]
                recon, mu, logvar = net(xb, bb, cb)
                rec = ((recon - xb) ** 2).sum(dim=1).mean()
                kl = kl_divergence(mu, logvar).mean()
                loss = rec + beta(epoch) * self.kl_weight * kl
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * rows.size
            return total / train_rows.size

        vidx = torch.as_tensor(val_rows, device=x.device)

        def validate() -> float:
            with torch.no_grad():
                mu, logvar = net.encode(x[vidx], b[vidx], c[vidx])
                recon = net.decode(mu, b[vidx], c[vidx])
                rec = ((recon - x[vidx]) ** 2).sum(dim=1).mean()
                return float(rec + self.kl_weight * kl_divergence(mu, logvar).mean())

        check = validate if val_rows.size else None
        warm = self.pretrain_epochs + self.anneal_epochs
        logs = []
        if warm:  # the changing KL weight: no early stopping, no best-epoch restore
            logs.append(run_epochs(train_epoch, epochs=warm, validate=check, modules=(),
                                   patience=warm + 1, progress=progress,
                                   desc="deepcombat (annealing)"))
        logs.append(run_epochs(lambda e: train_epoch(warm + e), epochs=self.epochs,
                               validate=check, modules=(net,), patience=self.patience,
                               progress=progress, desc="deepcombat"))
        log = TrainingLog(train_loss=[v for lg in logs for v in lg.train_loss],
                          val_loss=[v for lg in logs for v in lg.val_loss],
                          best_epoch=warm + logs[-1].best_epoch, stopped=logs[-1].stopped)
        net.eval()
        self.net_ = net
        mu, recon = self._encode(inp)
        self.latent_combat_ = self._combat().fit(mu, self._labels(inp["codes"]),
                                                  covariates)
        resid = inp["X"] - recon
        self.residual_combat_ = self._combat().fit(self._frame(resid, inp),
                                                   self._labels(inp["codes"]), covariates)
        self._record(inp, covariates, log, (train_rows, val_rows), time.perf_counter() - t0)
        return self

    def _encode(self, inp: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Latent means and reconstructions (feature units) of the rows of ``inp``."""
        import torch

        with torch.no_grad():
            x = self._tensor(self._standardise(inp["X"]))
            b = self._tensor(self._onehot(inp["codes"]))
            c = self._tensor(self._scaled_cov(inp["cov"]))
            mu, _ = self.net_.encode(x, b, c)
            recon = self.net_.decode(mu, b, c)
        return (mu.cpu().numpy().astype(np.float64),
                recon.cpu().numpy().astype(np.float64) * self.x_scale_ + self.x_mean_)

    @aligned
    def transform(self, X: Any, batch: Any, covariates: Any = None) -> Any:
        """Harmonize samples of fitted sites.

        Parameters
        ----------
        X : ndarray or DataFrame, shape (n_samples, n_features)
            Feature values (same features as at fit).
        batch : array-like, shape (n_samples,)
            Site labels (fitted sites only).
        covariates : DataFrame, optional
            The samples' covariates (same columns as at fit).

        Returns
        -------
        ndarray or DataFrame
            Harmonized features (float64, feature units); pandas labels kept.

        Raises
        ------
        HarmonizeError
            Not fitted, unknown site, other features or covariates than at fit.
        """
        import torch

        self._check_fitted()
        inp = self._apply_inputs(X, batch, covariates, self.residual_combat_)
        mu, recon = self._encode(inp)
        mu_star = self._numpy(self.latent_combat_.transform(mu, self._labels(inp["codes"]),
                                                               covariates))
        resid = self._numpy(self.residual_combat_.transform(
            self._frame(inp["X"] - recon, inp), self._labels(inp["codes"]), covariates))
        with torch.no_grad():
            out = self.net_.decode(self._tensor(mu_star),
                                   self._tensor(self._target_code(inp["n"])),
                                   self._tensor(self._scaled_cov(inp["cov"])))
        styled = out.cpu().numpy().astype(np.float64) * self.x_scale_ + self.x_mean_
        return self._frame(styled + resid, inp)

    def _export(self) -> tuple[dict[str, Any], dict[str, Any]]:
        state, tensors = self._input_state()
        lat_meta, lat = _combat_state(self.latent_combat_, "latent_combat")
        res_meta, res = _combat_state(self.residual_combat_, "residual_combat")
        state.update(dims=self.dims_, n_cov=int(self.cov_min_.size),
                     latent_combat=lat_meta, residual_combat=res_meta)
        tensors.update(lat, **res, **{f"net.{k}": v for k, v in self.net_.state_dict().items()})
        return state, tensors

    def _restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        from ._feature_nets import CVAE

        self._restore_inputs(state, tensors)
        self.dims_ = [int(d) for d in state["dims"]]
        net = CVAE(self.dims_, len(self.batches_), int(state["n_cov"]))
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.net_ = net.to(self.torch_device).eval()
        self.latent_combat_ = _combat_from(state["latent_combat"], tensors, "latent_combat")
        self.residual_combat_ = _combat_from(state["residual_combat"], tensors,
                                             "residual_combat")


# --------------------------------------------------------------------------- DeepResBat


class DeepResBat(_FeatureHarmonizer):
    """DeepResBat (An et al. 2024): learned covariate effects, ComBat on the residuals.

    1. An MLP ``f`` of the covariate design (min-max scaled; ``n_layers`` ``tanh`` layers
       of ``hidden`` units plus a linear skip) is fitted to the standardised features
       together with one nuisance offset per site and feature
       (``x ~ f(c) + o[site] - sum_k w_k o[k]``, ``w``: site proportions), minimising the
       mean squared error with Adam on minibatches, early stopping on a seeded
       ``val_fraction`` of the rows. ``f`` does not see the site, and the offsets keep site
       differences out of ``f`` even when the covariate distributions differ by site.
    2. Residuals ``r = x - f(c)`` (feature units) are harmonized by ComBat without
       covariates (location/scale per site, parametric empirical Bayes).
    3. ``y = ComBat(r) + f(c)``.

    Parameters
    ----------
    hidden : int
        Hidden-layer width.
    n_layers : int
        Hidden layers (>= 1).
    epochs : int
        Maximum training epochs (early stopping).
    weight_decay : float
        Adam weight decay (L2) of the network.
    patience : int
        Early-stopping patience (epochs).
    batch_size : int
        Minibatch size.
    categorical, ref_batch, val_fraction, lr, seed, device
        As :class:`DeepComBat`.
    """

    method: ClassVar[str] = "deepresbat"
    #: Constructor options of ``--quick``.
    QUICK: ClassVar[dict[str, Any]] = {"epochs": 60}

    def __init__(self, *, hidden: int = 32, n_layers: int = 2, epochs: int = 200,
                 weight_decay: float = 0.0, patience: int = 20, batch_size: int = 128,
                 **kwargs: Any) -> None:
        super().__init__(patience=patience, batch_size=batch_size, **kwargs)
        self.hidden = _check_int("hidden", hidden, 1)
        self.n_layers = _check_int("n_layers", n_layers, 1)
        self.epochs = _check_int("epochs", epochs, 1)
        if not float(weight_decay) >= 0:
            raise HarmonizeError(f"weight_decay: {weight_decay} must be >= 0")
        self.weight_decay = float(weight_decay)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "hidden": self.hidden, "n_layers": self.n_layers,
                "epochs": self.epochs, "weight_decay": self.weight_decay}

    @aligned
    def fit(self, X: Any, batch: Any, covariates: Any = None, *,
            progress: bool = False) -> DeepResBat:
        """Learn the covariate effects and fit ComBat on the residuals.

        Parameters
        ----------
        X : ndarray or DataFrame, shape (n_samples, n_features)
            Feature values (any unit; complete rows).
        batch : array-like, shape (n_samples,)
            Site label of each sample.
        covariates : DataFrame
            Biological covariates whose effects are learned and preserved (at least one
            column).
        progress : bool
            Show a progress bar.

        Returns
        -------
        DeepResBat
            ``self``.

        Raises
        ------
        HarmonizeError
            As :meth:`ComBat.fit`, no covariates, missing values, or divergence.
        """
        import torch

        from ._feature_nets import CovariateNet

        t0 = time.perf_counter()
        inp = self._fit_inputs(X, batch, covariates)
        if inp["cov"].shape[1] == 0:
            raise HarmonizeError("deepresbat: no covariates; it learns their effects "
                                 "(without covariates use combat)")
        codes = inp["codes"]
        train_rows, val_rows = _split_rows(codes, self.val_fraction, self.seed)
        weights = np.bincount(codes[train_rows], minlength=len(self.batches_))
        seed_all(self.seed)
        net = CovariateNet(inp["cov"].shape[1], inp["p"], self.hidden, self.n_layers,
                           (weights / weights.sum()).tolist()).to(self.torch_device)
        x = self._tensor(self._standardise(inp["X"]))
        c = self._tensor(self._scaled_cov(inp["cov"]))
        k = torch.as_tensor(codes, device=x.device)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(self.seed)

        def train_epoch(epoch: int) -> float:
            total = 0.0
            for rows in self._minibatches(train_rows, gen):
                idx = torch.as_tensor(rows, device=x.device)
                loss = ((net.with_site(c[idx], k[idx]) - x[idx]) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * rows.size
            return total / train_rows.size

        vidx = torch.as_tensor(val_rows, device=x.device)

        def validate() -> float:
            with torch.no_grad():
                return float(((net.with_site(c[vidx], k[vidx]) - x[vidx]) ** 2).mean())

        log = run_epochs(train_epoch, epochs=self.epochs,
                         validate=validate if val_rows.size else None, modules=(net,),
                         patience=self.patience, progress=progress, desc="deepresbat")
        self.net_ = net.eval()
        effect = self._effect(inp["cov"])
        self.combat_ = self._combat().fit(self._frame(inp["X"] - effect, inp),
                                          self._labels(codes))
        self._record(inp, covariates, log, (train_rows, val_rows), time.perf_counter() - t0)
        return self

    def _effect(self, cov: np.ndarray) -> np.ndarray:
        """Learned covariate effects (feature units, grand mean included)."""
        import torch

        with torch.no_grad():
            f = self.net_(self._tensor(self._scaled_cov(cov)))
        return f.cpu().numpy().astype(np.float64) * self.x_scale_ + self.x_mean_

    @aligned
    def transform(self, X: Any, batch: Any, covariates: Any = None) -> Any:
        """Harmonize samples of fitted sites (see :meth:`DeepComBat.transform`)."""
        self._check_fitted()
        inp = self._apply_inputs(X, batch, covariates, self.combat_)
        effect = self._effect(inp["cov"])
        resid = self._numpy(self.combat_.transform(self._frame(inp["X"] - effect, inp),
                                                   self._labels(inp["codes"])))
        return self._frame(resid + effect, inp)

    def _export(self) -> tuple[dict[str, Any], dict[str, Any]]:
        state, tensors = self._input_state()
        meta, arrays = _combat_state(self.combat_, "combat")
        state.update(n_cov=int(self.cov_min_.size), combat=meta)
        tensors.update(arrays, **{f"net.{k}": v for k, v in self.net_.state_dict().items()})
        return state, tensors

    def _restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        from ._feature_nets import CovariateNet

        self._restore_inputs(state, tensors)
        n_batch = len(self.batches_)
        net = CovariateNet(int(state["n_cov"]), self.n_features_in_, self.hidden,
                           self.n_layers, [1.0 / n_batch] * n_batch)
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.net_ = net.to(self.torch_device).eval()
        self.combat_ = _combat_from(state["combat"], tensors, "combat")
