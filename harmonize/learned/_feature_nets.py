"""PyTorch networks of the feature-level learned harmonizers (imported lazily).

This module imports :mod:`torch` at the top, so only :mod:`.feature` imports it, inside
the methods that train or apply a model (``mrharmony.harmonize.learned.feature`` itself
imports without torch).

* :class:`CVAE`: DeepComBat's conditional VAE (Hu et al. 2023): encoder and decoder are
  fully connected with ``tanh`` activations, both conditioned on the batch one-hot and the
  covariate design; the layer widths fall linearly from the feature count to the latent
  size (:func:`vae_dims`, the rule of the authors' R package).
* :class:`CovariateNet`: DeepResBat's covariate-effect model: an MLP of the covariate
  design (plus a linear skip), trained jointly with one nuisance offset per batch and
  feature, so that the learned effect is free of site (the offsets are not used to
  harmonize).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

__all__ = ["CVAE", "CovariateNet", "kl_divergence", "vae_dims"]


def vae_dims(n_features: int, latent_dim: int, n_hidden: int) -> list[int]:
    """Layer widths ``[n_features, hidden..., latent_dim]`` of DeepComBat's CVAE.

    Hidden width ``i`` (1-based) is ``latent + floor((p - latent) * (n_hidden - i + 1) /
    (n_hidden + 1))``, as ``deepcombat_cvae$calculate_vae_dim`` (widths fall linearly).

    Parameters
    ----------
    n_features : int
        Number of input features ``p``.
    latent_dim : int
        Latent size (``< p``).
    n_hidden : int
        Number of hidden layers (>= 0).

    Returns
    -------
    list of int
    """
    span = n_features - latent_dim
    hidden = [latent_dim + (span * (n_hidden - i + 1)) // (n_hidden + 1)
              for i in range(1, n_hidden + 1)]
    return [n_features, *hidden, latent_dim]


def _mlp(widths: list[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))


class CVAE(nn.Module):
    """Conditional VAE with batch and covariates fed to encoder and decoder.

    Parameters
    ----------
    dims : list of int
        ``[n_features, hidden..., latent_dim]`` (:func:`vae_dims`).
    n_batch : int
        Width of the batch code (one column per batch level).
    n_cov : int
        Width of the covariate design.
    """

    def __init__(self, dims: list[int], n_batch: int, n_cov: int) -> None:
        super().__init__()
        self.dims = list(dims)
        cond = n_batch + n_cov
        enc = [dims[0] + cond, *dims[1:-1]]
        self.encoder = _mlp(enc)
        self.mu = nn.Linear(enc[-1], dims[-1])
        self.logvar = nn.Linear(enc[-1], dims[-1])
        dec = [dims[-1] + cond, *dims[-2:0:-1], dims[0]]
        self.decoder = _mlp(dec)

    def encode(self, x: torch.Tensor, b: torch.Tensor, c: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and log-variance of standardised features ``x``."""
        h = torch.cat([x, b, c], dim=1)
        for layer in self.encoder:
            h = torch.tanh(layer(h))
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Standardised features from latent ``z`` under batch code ``b``."""
        h = torch.cat([z, b, c], dim=1)
        for layer in self.decoder[:-1]:
            h = torch.tanh(layer(h))
        return self.decoder[-1](h)

    def forward(self, x: torch.Tensor, b: torch.Tensor, c: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction from a reparameterised sample, latent mean and log-variance."""
        mu, logvar = self.encode(x, b, c)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return self.decode(z, b, c), mu, logvar


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL divergence of ``N(mu, exp(logvar))`` from ``N(0, I)``, summed over the latent
    dimensions, one value per row."""
    return 0.5 * torch.sum(mu.pow(2) + logvar.exp() - 1.0 - logvar, dim=1)


class CovariateNet(nn.Module):
    """Covariate effects ``f(c)`` (all features at once) plus nuisance batch offsets.

    ``f(c) = W c + b + MLP(c)`` (``tanh`` hidden layers). :meth:`with_site` adds
    ``o[batch] - sum_k w_k o[k]`` (``w``: the training batch proportions, a buffer), so
    ``f`` carries the grand mean and the covariate effect at the size-weighted average
    site, as ComBat's grand mean.

    Parameters
    ----------
    n_cov : int
        Width of the covariate design (>= 1).
    n_features : int
        Number of features.
    hidden : int
        Width of the hidden layers.
    n_layers : int
        Number of hidden layers (>= 1).
    batch_weights : sequence of float
        Training proportion of each batch level.
    """

    def __init__(self, n_cov: int, n_features: int, hidden: int, n_layers: int,
                 batch_weights: list[float]) -> None:
        super().__init__()
        self.linear = nn.Linear(n_cov, n_features)
        self.hidden = _mlp([n_cov] + [hidden] * n_layers)
        self.out = nn.Linear(hidden, n_features)
        self.offsets = nn.Parameter(torch.zeros(len(batch_weights), n_features))
        self.register_buffer("batch_weights", torch.as_tensor(batch_weights,
                                                              dtype=torch.float32))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """Covariate effect (standardised feature units), shape ``(n, n_features)``."""
        h = c
        for layer in self.hidden:
            h = torch.tanh(layer(h))
        return self.linear(c) + self.out(h)

    def with_site(self, c: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Covariate effect plus the centred nuisance offset of each row's batch."""
        centred = self.offsets - self.batch_weights @ self.offsets
        return self.forward(c) + centred[codes]
