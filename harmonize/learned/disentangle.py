"""Disentangling harmonization: a CALAMITI-style anatomy/contrast separation.

CALAMITI (Zuo et al. 2021, NeuroImage 245:118569) learns, from two contrasts (T1w and
T2w) of the same subject acquired in the same session, an *anatomy* representation
``beta`` shared by both contrasts and a *contrast* representation ``theta`` (a small
vector) that carries everything else, including the site's acquisition:

- anatomy encoder: a U-Net to ``n_beta`` channels, a softmax over the channels at
  temperature ``tau`` (training: Gumbel-softmax, the paper's one-hot-like beta; applying:
  the noise-free softmax);
- contrast encoder (:class:`~mrharmony.harmonize.learned.nets.ContrastEncoder`): mean
  and log-variance of ``theta`` (``theta_dim``, the paper: 2), sampled by the VAE
  reparameterisation during training;
- decoder: a U-Net on ``[beta, theta broadcast over the image]`` (without instance
  normalisation, which would subtract the constant theta channels away).

Training pairs are a subject's T1w and T2w images at the same site (the toolkit's
datasets have both, from the same virtual subject and slice). Loss::

    |D(beta_2, theta_1) - x_1|_1 + |D(beta_1, theta_2) - x_2|_1          (beta swapping)
    + lambda_beta * |beta_1 - beta_2|_1                                  (beta similarity)
    + lambda_kl * KL(q(theta | x) || N(0, I))                           (both images)

Harmonizing an image of site ``s`` to site ``t``: ``beta`` from the image and ``theta`` =
the mean ``theta`` (posterior mean) of site ``t``'s training images of that contrast,
stored in the model; every site can be the target.

Deviations from the paper: no adversarial site discriminator or contrastive term on
``theta`` (the paper's later versions use them to make theta site-informative), no
perceptual loss, a smaller U-Net (quick: 2 poolings, 8..32 channels; default 3, 16..128),
2-D slices of one orientation, a fixed Gumbel temperature, and the image intensity is
normalised by each image's robust maximum (the paper: white-matter peak). Networks are
in :mod:`.nets`, imported only inside the methods, so this module imports without
PyTorch.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from mrharmony.errors import HarmonizeError

from . import require_torch
from .base import LearnedImageHarmonizer, run_epochs, seed_all
from .data import robust_scale
from .model_file import fingerprint

__all__ = ["Calamiti"]


class Calamiti(LearnedImageHarmonizer):
    """CALAMITI-style harmonizer: anatomy (beta) from the image, contrast (theta) of the
    target site.

    Parameters
    ----------
    contrasts : tuple of str
        The two contrasts of a training pair (dataset ``contrast`` values).
    n_beta : int
        Channels of the anatomy representation.
    theta_dim : int
        Dimension of the contrast representation.
    tau : float
        Softmax (Gumbel-softmax) temperature of beta.
    base, depth : int
        U-Net size of the anatomy encoder and of the decoder.
    lambda_beta, lambda_kl : float
        Weights of the beta similarity and KL losses.
    **kwargs
        :class:`~mrharmony.harmonize.learned.base.LearnedImageHarmonizer` options;
        ``contrast`` is the contrast :meth:`transform` harmonizes by default (one of
        ``contrasts``), ``target_site`` the default target.
    """

    method: ClassVar[str] = "calamiti"
    QUICK: ClassVar[dict[str, Any]] = {"base": 8, "depth": 2, "epochs": 150, "batch_size": 4,
                                       "patience": 25}

    def __init__(self, *, contrasts: tuple[str, str] | list[str] = ("t1w", "t2w"),
                 n_beta: int = 4, theta_dim: int = 2, tau: float = 0.5, base: int = 16,
                 depth: int = 3, lambda_beta: float = 1.0, lambda_kl: float = 1e-3,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.contrasts = [str(c) for c in contrasts]
        if len(self.contrasts) != 2 or self.contrasts[0] == self.contrasts[1]:
            raise HarmonizeError(f"calamiti: contrasts must be two different contrasts, got "
                                 f"{self.contrasts}")
        if self.contrast not in self.contrasts:
            raise HarmonizeError(f"calamiti: contrast {self.contrast!r} is not one of the "
                                 f"trained contrasts {self.contrasts}")
        if min(n_beta, theta_dim, base, depth) < 1 or not tau > 0:
            raise HarmonizeError("calamiti: n_beta, theta_dim, base, depth >= 1 and tau > 0")
        if lambda_beta < 0 or lambda_kl < 0:
            raise HarmonizeError("calamiti: lambda_beta and lambda_kl must be >= 0")
        self.n_beta, self.theta_dim, self.tau = int(n_beta), int(theta_dim), float(tau)
        self.base, self.depth = int(base), int(depth)
        self.lambda_beta, self.lambda_kl = float(lambda_beta), float(lambda_kl)
        self.size_multiple = 2 ** self.depth
        self.scales_by_contrast_: dict[str, dict[str, float]] = {}
        self.nets_: Any = None
        self.theta_means_: Any = None  # (sites, 2 contrasts, theta_dim) tensor

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "contrasts": self.contrasts, "n_beta": self.n_beta,
                "theta_dim": self.theta_dim, "tau": self.tau, "base": self.base,
                "depth": self.depth, "lambda_beta": self.lambda_beta,
                "lambda_kl": self.lambda_kl}

    def _build(self) -> None:
        torch = require_torch()
        from .nets import ContrastEncoder, UNet

        self.nets_ = torch.nn.ModuleDict({
            "beta": UNet(1, self.n_beta, base=self.base, depth=self.depth),
            "theta": ContrastEncoder(1, dim=self.theta_dim, base=self.base),
            "decoder": UNet(self.n_beta + self.theta_dim, 1, base=self.base,
                            depth=self.depth, norm=False),
        }).to(self.torch_device)

    # -- pieces -----------------------------------------------------------------------
    def beta(self, x: Any, *, gumbel: bool = False) -> Any:
        """Anatomy representation ``(B, n_beta, H, W)`` of normalised images ``x``."""
        torch = require_torch()
        logits = self.nets_["beta"](x)
        if gumbel:
            return torch.nn.functional.gumbel_softmax(logits, tau=self.tau, dim=1)
        return torch.softmax(logits / self.tau, dim=1)

    def decode(self, beta: Any, theta: Any) -> Any:
        """Image from anatomy ``beta`` and contrast ``theta`` ``(B, theta_dim)``."""
        torch = require_torch()
        t = theta[:, :, None, None].expand(-1, -1, *beta.shape[-2:])
        return self.nets_["decoder"](torch.cat([beta, t], 1))

    def _pairs(self, data: Any, split: str) -> tuple[Any, Any, np.ndarray]:
        """Normalised ``(x_1, x_2)`` of the same subject, site and slice, and the rows."""
        torch = require_torch()
        t = data.table
        c1, c2 = self.contrasts
        key = {(r.subject, r.site, int(r.slice)): i
               for i, r in zip(data.rows(contrast=c2, split=split),
                               t.iloc[data.rows(contrast=c2, split=split)].itertuples(),
                               strict=True)}
        rows = []
        for i in data.rows(contrast=c1, split=split):
            r = t.iloc[i]
            j = key.get((r["subject"], r["site"], int(r["slice"])))
            if j is not None:
                rows.append((i, j))
        rows_arr = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
        if not len(rows_arr):
            return torch.empty(0), torch.empty(0), rows_arr
        x1 = torch.from_numpy(self._normalised(data.images[rows_arr[:, 0]]))[:, None]
        x2 = torch.from_numpy(self._normalised(data.images[rows_arr[:, 1]]))[:, None]
        return self._pad(x1)[0], self._pad(x2)[0], rows_arr

    def loss_terms(self, x1: Any, x2: Any, *, sample: bool = True) -> dict[str, Any]:
        """The loss terms of a batch of pairs (``sample``: Gumbel noise and theta sampled).

        Returns
        -------
        dict
            ``reconstruction``, ``beta``, ``kl`` and ``total`` (scalar tensors).
        """
        torch = require_torch()
        import torch.nn.functional as F

        b1, b2 = self.beta(x1, gumbel=sample), self.beta(x2, gumbel=sample)
        thetas, kl = [], 0.0
        for x in (x1, x2):
            mu, logvar = self.nets_["theta"](x)
            th = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
            thetas.append(th)
            kl = kl + 0.5 * torch.mean(torch.sum(mu ** 2 + logvar.exp() - 1 - logvar, 1))
        rec = F.l1_loss(self.decode(b2, thetas[0]), x1) + F.l1_loss(self.decode(b1, thetas[1]),
                                                                    x2)
        sim = F.l1_loss(b1, b2)
        total = rec + self.lambda_beta * sim + self.lambda_kl * kl
        return {"reconstruction": rec, "beta": sim, "kl": kl, "total": total}

    def fit(self, data: Any, *, progress: bool = False) -> Calamiti:
        """Train on the ``train`` split's contrast pairs (early stopping on ``validation``).

        Parameters
        ----------
        data : ImageDataset
            Images of both ``contrasts`` of the same subjects and slices at each site.
        progress : bool
            Show a progress bar.

        Returns
        -------
        Calamiti
            ``self``.

        Raises
        ------
        HarmonizeError
            Fewer than two sites, or no subject with both contrasts at a site.
        """
        torch = require_torch()

        seed_all(self.seed)
        self._resolve_sites(data, need_pairs=False)
        self.scales_by_contrast_ = {}
        for c in self.contrasts:
            if c not in set(data.table["contrast"]):
                raise HarmonizeError(f"calamiti: no {c!r} images in the data")
            self.scales_by_contrast_[c] = {
                s: float(np.median([robust_scale(data.images[i]) for i in
                                    data.rows(contrast=c, split="train", site=s)] or [1.0]))
                for s in self.sites_}
        x1, x2, rows = self._pairs(data, "train")
        if not len(rows):
            raise HarmonizeError(f"calamiti: no subject with both {self.contrasts[0]} and "
                                 f"{self.contrasts[1]} at the same site in the train split")
        missing = [s for s in self.sites_ if s not in set(data.table["site"].iloc[rows[:, 0]])]
        if missing:
            raise HarmonizeError(f"calamiti: no training pair at site(s) {', '.join(missing)}")
        x1v, x2v, _ = self._pairs(data, "validation")
        dev = self.torch_device
        self._build()
        opt = torch.optim.Adam(self.nets_.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        history: dict[str, list[float]] = {"reconstruction": [], "beta": [], "kl": []}

        def epoch(_: int) -> float:
            sums = np.zeros(4)
            for b in self._batches(len(x1), gen):
                xb1, xb2 = self._flip(gen, x1[b], x2[b])
                terms = self.loss_terms(xb1.to(dev), xb2.to(dev))
                opt.zero_grad()
                terms["total"].backward()
                opt.step()
                sums += [float(terms[k].detach()) * len(b)
                         for k in ("reconstruction", "beta", "kl", "total")]
            for k, v in zip(history, sums[:3] / len(x1), strict=False):
                history[k].append(float(v))
            return float(sums[3] / len(x1))

        def validate() -> float:
            with torch.no_grad():
                return float(self.loss_terms(x1v.to(dev), x2v.to(dev), sample=False)["total"])

        log = run_epochs(epoch, epochs=self.epochs, validate=validate if len(x1v) else None,
                         modules=(self.nets_,), patience=self.patience, progress=progress,
                         desc="calamiti")
        # theta of each site and contrast: mean posterior mean of its training images
        means = torch.zeros(len(self.sites_), 2, self.theta_dim)
        with torch.no_grad():
            for k, s in enumerate(self.sites_):
                for c in range(2):
                    sel = torch.from_numpy(np.flatnonzero(
                        data.table["site"].iloc[rows[:, c]].to_numpy() == s))
                    xs = (x1 if c == 0 else x2)[sel].to(dev)
                    means[k, c] = self.nets_["theta"](xs)[0].mean(0).cpu()
        self.theta_means_ = means
        self.training_ = {"fingerprint": fingerprint(x1, x2), "seed": self.seed,
                          "pairs": len(x1), "validation_pairs": len(x1v),
                          "epochs_run": len(log.train_loss), **log.as_dict(),
                          "losses": history,
                          "theta_means": {s: {c: means[k, j].tolist()
                                              for j, c in enumerate(self.contrasts)}
                                          for k, s in enumerate(self.sites_)}}
        return self

    def transform(self, images: np.ndarray, site: str, *, target: str | None = None,
                  batch_size: int = 16, contrast: str | None = None) -> np.ndarray:
        """Harmonize images of ``site`` to ``target`` (default: the model's target site).

        Parameters
        ----------
        images : numpy.ndarray
            ``(H, W)`` or ``(N, H, W)`` magnitude images of one contrast.
        site : str
            The site they come from (a training site).
        target : str, optional
            Any training site (its mean theta is used).
        batch_size : int
            Slices per forward pass.
        contrast : str, optional
            The images' contrast (one of ``contrasts``; default the ``contrast`` option).

        Returns
        -------
        numpy.ndarray
            Float32, same shape, in the target site's intensity unit for that contrast.

        Raises
        ------
        HarmonizeError
            Not fitted, an unknown site or contrast, or images that are not 2-D.
        """
        c = contrast or self.contrast
        if c not in self.contrasts:
            raise HarmonizeError(f"calamiti: contrast {c!r} is not one of the trained "
                                 f"contrasts {self.contrasts}")
        saved = (self.contrast, self.scales_)
        self._applying = c
        try:
            if self.scales_by_contrast_:
                self.scales_ = self.scales_by_contrast_[c]
            return super().transform(images, site, target=target, batch_size=batch_size)
        finally:
            self.contrast, self.scales_ = saved
            self._applying = self.contrast

    def _forward(self, x: Any, site: str, target: str) -> Any:
        c = self.contrasts.index(getattr(self, "_applying", self.contrast))
        theta = self.theta_means_[self.sites_.index(target), c].to(x.device)
        return self.decode(self.beta(x), theta[None].expand(len(x), -1))

    def _export(self) -> tuple[dict[str, Any], dict[str, Any]]:
        tensors = {f"nets.{k}": v for k, v in self.nets_.state_dict().items()}
        tensors["theta_means"] = self.theta_means_
        return {**self._image_state(), "scales_by_contrast": self.scales_by_contrast_}, tensors

    def _restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        self._restore_image_state(state)
        self.scales_by_contrast_ = {c: {s: float(v) for s, v in d.items()}
                                    for c, d in state["scales_by_contrast"].items()}
        self._build()
        self.nets_.load_state_dict({k[5:]: v for k, v in tensors.items()
                                    if k.startswith("nets.")})
        self.nets_.eval()
        self.theta_means_ = tensors["theta_means"].float().cpu()
