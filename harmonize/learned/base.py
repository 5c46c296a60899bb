"""The interface every learned harmonizer shares, and its training loop.

A learned harmonizer is a class registered in :mod:`mrharmony.harmonize.registry`
(``learned=True``). It is built from keyword options (``make_harmonizer(name, **opts)``),
trained with ``fit`` on data with sites (and covariates), applied with ``transform``, and
saved and loaded as a model folder (:mod:`.model_file`): ``save(path)`` /
``load_harmonizer(path)``. Feature-level ones take the same ``fit(X, batch, covariates)``
/ ``transform(X, batch, covariates)`` as the ComBat family, so the CLI, the study runner
and the benchmark use learned and classical methods the same way.

Subclasses set :attr:`method` (the registry name) and implement three hooks:
``_options()`` (JSON constructor options), ``_export()`` -> ``(state, tensors)`` and
``_restore(state, tensors)``. Training goes through :func:`run_epochs` (seeded, early
stopping on a validation loss, a progress bar, the loss history for the curve plot).

This module imports :mod:`torch` only inside functions: importing it needs no extra.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mrharmony.errors import HarmonizeError, ModelFileError

from . import require_torch, torch_device
from .data import robust_scale
from .model_file import read_config, read_learned, write_learned

__all__ = ["LearnedHarmonizer", "LearnedImageHarmonizer", "TrainingLog", "load_harmonizer",
           "run_epochs", "seed_all"]


def seed_all(seed: int) -> None:
    """Seed Python and torch, and ask torch for deterministic kernels (NumPy code takes
    its own ``np.random.default_rng(seed)``).

    With the same seed, data and machine, training gives the same weights.
    """
    torch = require_torch()
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class TrainingLog:
    """What training did: losses per epoch, the best epoch, and why it stopped.

    Attributes
    ----------
    train_loss, val_loss : list of float
        Mean training and validation loss per epoch (validation may be empty).
    best_epoch : int
        The epoch (0-based) whose weights were kept (lowest validation loss).
    stopped : str
        ``"max_epochs"`` or ``"early_stopping"``.
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped: str = "max_epochs"

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (stored in the model's ``training`` record)."""
        return {"train_loss": self.train_loss, "val_loss": self.val_loss,
                "best_epoch": self.best_epoch, "stopped": self.stopped}


def run_epochs(train_epoch: Callable[[int], float], *, epochs: int,
               validate: Callable[[], float] | None = None,
               modules: tuple[Any, ...] = (), patience: int = 5,
               progress: bool = False, desc: str = "training",
               min_epochs: int = 0) -> TrainingLog:
    """Run a training loop with early stopping on the validation loss.

    Parameters
    ----------
    train_epoch : callable
        ``train_epoch(epoch) -> mean training loss`` runs one epoch (the caller's
        optimiser steps, batches and losses).
    epochs : int
        Maximum number of epochs.
    validate : callable, optional
        ``validate() -> validation loss`` (no gradients). Without it the last epoch's
        weights are kept.
    modules : tuple of torch.nn.Module
        The modules whose weights are restored to the best validation epoch at the end
        (and switched between train and eval mode around ``validate``).
    patience : int
        Stop after this many epochs without a lower validation loss.
    progress : bool
        Show a progress bar (tqdm) with the losses.
    desc : str
        The progress bar's label.
    min_epochs : int
        Epochs whose validation loss is recorded but neither kept nor counted for early
        stopping (for losses that favour an untrained network, e.g. CycleGAN's
        cycle-consistency, which the identity mapping satisfies).

    Returns
    -------
    TrainingLog

    Raises
    ------
    HarmonizeError
        If a loss becomes non-finite (divergence), naming the epoch.
    """
    require_torch()
    import copy

    from tqdm.auto import tqdm

    log = TrainingLog()
    best = math.inf
    best_state: list[dict[str, Any]] | None = None
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        for m in modules:
            m.train()
        loss = float(train_epoch(epoch))
        if not math.isfinite(loss):
            raise HarmonizeError(f"{desc}: training loss became {loss} at epoch {epoch + 1} "
                                 "(diverged; lower the learning rate)")
        log.train_loss.append(loss)
        if validate is None:
            log.best_epoch = epoch
            bar.set_postfix(loss=f"{loss:.4g}")
            continue
        for m in modules:
            m.eval()
        val = float(validate())
        log.val_loss.append(val)
        bar.set_postfix(loss=f"{loss:.4g}", val=f"{val:.4g}")
        if epoch < min_epochs:
            continue
        if val < best:
            best, log.best_epoch = val, epoch
            best_state = [copy.deepcopy(m.state_dict()) for m in modules]
        elif epoch - log.best_epoch >= patience:
            log.stopped = "early_stopping"
            break
    bar.close()
    if best_state is not None:
        for m, state in zip(modules, best_state, strict=True):
            m.load_state_dict(state)
    else:  # no validation, or training ended within min_epochs: the last weights
        log.best_epoch = len(log.train_loss) - 1
    for m in modules:
        m.eval()
    return log


class LearnedHarmonizer:
    """Base class of the learned harmonizers (see the module docstring).

    Attributes
    ----------
    method : str
        The registry name (class attribute).
    training_ : dict
        After ``fit`` or ``load``: the training record (data fingerprint, seed, epochs,
        losses, :class:`TrainingLog` as a dict).
    """

    method: ClassVar[str] = ""

    def __init__(self, *, seed: int = 0, device: str = "auto") -> None:
        self.seed = int(seed)
        self.device = device
        self.training_: dict[str, Any] | None = None

    # -- hooks ------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        """Constructor options (JSON) that rebuild an unfitted instance."""
        return {"seed": self.seed}

    def _export(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Fitted state: ``(JSON state, {name: tensor or array})``."""
        raise NotImplementedError

    def _restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        """Rebuild the fitted model from what :meth:`_export` returned."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------
    @property
    def torch_device(self) -> str:
        """The concrete torch device (``"cpu"`` or ``"cuda:N"``)."""
        return torch_device(self.device)

    def _check_fitted(self) -> None:
        if self.training_ is None:
            raise HarmonizeError(f"{self.method}: not fitted (call fit or load a model)")

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the fitted model to the folder ``path`` (see :mod:`.model_file`).

        Raises
        ------
        HarmonizeError
            If the model is not fitted.
        ModelFileError
            If the folder exists and ``force`` is false, or cannot be written.
        """
        self._check_fitted()
        state, tensors = self._export()
        return write_learned(path, method=self.method, tensors=tensors,
                             options=self._options(), state=state,
                             training=self.training_, force=force)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> LearnedHarmonizer:
        """Read a model folder written by :meth:`save` of this class.

        Raises
        ------
        ModelFileError
            If the folder holds another method's model or is not a model.
        """
        config, tensors = read_learned(path)
        if config["method"] != cls.method:
            raise ModelFileError(f"{path}: a {config['method']!r} model, not {cls.method!r}")
        try:
            obj = cls(**config["options"])
        except TypeError as exc:
            raise ModelFileError(f"{path}: options do not fit {cls.__name__} ({exc})") from exc
        obj.device = device
        try:
            obj._restore(config["state"], tensors)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ModelFileError(f"{path}: weights do not fit the {cls.method} model "
                                 f"({exc})") from exc
        obj.training_ = config["training"]
        return obj


def load_harmonizer(path: str | Path, *, device: str = "auto") -> LearnedHarmonizer:
    """Load any learned model folder, whatever its method.

    Raises
    ------
    ModelFileError
        Not a learned model, or a method this version does not know.
    """
    from mrharmony.harmonize.registry import HARMONIZERS

    method = read_config(path)["method"]
    spec = HARMONIZERS.get(method)
    if spec is None or not spec.learned:
        raise ModelFileError(f"{path}: unknown learned method {method!r}")
    return spec.load().load(path, device=device)


class LearnedImageHarmonizer(LearnedHarmonizer):
    """Shared machinery of the image-level learned harmonizers (2-D slices).

    Every image is divided by its own robust maximum
    (:func:`~mrharmony.harmonize.learned.data.robust_scale`) before it enters a network,
    and a harmonized image is returned in the target site's intensity unit (the network
    output times the median robust maximum of the target site's training images). Slices
    are zero-padded to a multiple of :attr:`size_multiple` and cropped back.

    Parameters
    ----------
    target_site : str, optional
        The site images are harmonized to (default: the dataset's first site).
    contrast : str
        The contrast (dataset ``contrast`` column) the model is trained on.
    epochs, batch_size, lr, patience : int, int, float, int
        Training length, mini-batch size, Adam learning rate, early-stopping patience.
    seed : int
        Seed of the weights, the batch order and the augmentation.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda:N"`` (not stored in the model).
    """

    #: Constructor options of ``mrharmony harmonize train --quick`` (sizes for 2 cores).
    QUICK: ClassVar[dict[str, Any]] = {}

    def __init__(self, *, target_site: str | None = None, contrast: str = "t1w",
                 epochs: int = 100, batch_size: int = 8, lr: float = 1e-3,
                 patience: int = 15, seed: int = 0, device: str = "auto") -> None:
        super().__init__(seed=seed, device=device)
        if epochs < 1 or batch_size < 1 or patience < 1 or not lr > 0:
            raise HarmonizeError(f"{self.method}: epochs, batch_size and patience must be "
                                 ">= 1 and lr > 0")
        self.target_site = target_site
        self.contrast = contrast
        self.epochs, self.batch_size, self.lr = int(epochs), int(batch_size), float(lr)
        self.patience = int(patience)
        self.sites_: list[str] = []
        self.scales_: dict[str, float] = {}
        self.progress = False

    size_multiple: int = 8

    def _options(self) -> dict[str, Any]:
        return {"target_site": self.target_site, "contrast": self.contrast,
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "patience": self.patience, "seed": self.seed}

    # -- data -----------------------------------------------------------------------
    def _resolve_sites(self, data: Any, *, need_pairs: bool = True) -> str:
        """Check the dataset and fix ``sites_`` and the target site."""
        sites = data.sites
        if self.contrast not in set(data.table["contrast"]):
            raise HarmonizeError(f"{self.method}: no {self.contrast!r} images in the data "
                                 f"(contrasts: {sorted(set(data.table['contrast']))})")
        if len(sites) < 2:
            raise HarmonizeError(f"{self.method}: needs images from at least two sites")
        target = self.target_site or sites[0]
        if target not in sites:
            raise HarmonizeError(f"{self.method}: target site {target!r} not in the data "
                                 f"(sites: {', '.join(sites)})")
        self.sites_ = list(sites)
        self.target_site = target
        rows = data.rows(contrast=self.contrast, split="train")
        if rows.size == 0:
            raise HarmonizeError(f"{self.method}: no training images ('train' split)")
        self.scales_ = {}
        for s in sites:
            r = data.rows(contrast=self.contrast, split="train", site=s)
            if r.size == 0:
                raise HarmonizeError(f"{self.method}: no training images of site {s!r}")
            self.scales_[s] = float(np.median([robust_scale(data.images[i]) for i in r]))
        return target

    @staticmethod
    def _normalised(images: np.ndarray) -> np.ndarray:
        return np.stack([im / robust_scale(im) for im in images]).astype(np.float32)

    def _check_site(self, site: str) -> None:
        self._check_fitted()
        if site not in self.sites_:
            raise HarmonizeError(f"{self.method}: site {site!r} was not in the training data "
                                 f"(sites: {', '.join(self.sites_)})")

    def _pad(self, x: Any) -> tuple[Any, tuple[int, int]]:
        torch = require_torch()
        h, w = x.shape[-2:]
        m = self.size_multiple
        ph, pw = (-h) % m, (-w) % m
        return torch.nn.functional.pad(x, (0, pw, 0, ph)), (h, w)

    def _batches(self, n: int, generator: Any) -> list[Any]:
        torch = require_torch()
        order = torch.randperm(n, generator=generator)
        return [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]

    @staticmethod
    def _flip(generator: Any, *tensors: Any) -> list[Any]:
        """Left-right flip of a whole batch with probability 1/2 (augmentation)."""
        torch = require_torch()
        if bool(torch.rand(1, generator=generator) < 0.5):
            return [t.flip(-1) for t in tensors]
        return list(tensors)

    # -- applying -------------------------------------------------------------------
    def _forward(self, x: Any, site: str, target: str) -> Any:
        """Network output for normalised ``(B, 1, H, W)`` inputs (implemented per class)."""
        raise NotImplementedError

    def transform(self, images: np.ndarray, site: str, *, target: str | None = None,
                  batch_size: int = 16) -> np.ndarray:
        """Harmonize 2-D images of ``site`` to the target site.

        Parameters
        ----------
        images : numpy.ndarray
            ``(H, W)`` or ``(N, H, W)`` magnitude images.
        site : str
            The site the images come from (one of the training sites).
        target : str, optional
            Target site, for methods that can harmonize to any training site (MISPEL);
            default the model's target site.
        batch_size : int
            Slices per forward pass.

        Returns
        -------
        numpy.ndarray
            Float32, same shape, in the target site's intensity unit.

        Raises
        ------
        HarmonizeError
            Not fitted, an unknown site, or images that are not 2-D slices.
        """
        torch = require_torch()
        self._check_site(site)
        target = target or self.target_site
        assert target is not None
        self._check_site(target)
        arr = np.asarray(images, dtype=np.float32)
        single = arr.ndim == 2
        if single:
            arr = arr[None]
        if arr.ndim != 3:
            raise HarmonizeError(f"{self.method}: expected (H, W) or (N, H, W) images, got "
                                 f"shape {arr.shape}")
        scales = np.array([robust_scale(im) for im in arr], dtype=np.float32)
        out = np.empty_like(arr)
        dev = self.torch_device
        with torch.no_grad():
            for i in range(0, len(arr), batch_size):
                x = torch.from_numpy(np.abs(arr[i:i + batch_size])
                                     / scales[i:i + batch_size, None, None])[:, None].to(dev)
                xp, (h, w) = self._pad(x)
                y = self._forward(xp, site, target)[..., :h, :w]
                out[i:i + batch_size] = y[:, 0].cpu().numpy()
        out = np.maximum(out, 0.0) * self.scales_[target]
        return out[0] if single else out

    def transform_volume(self, volume: np.ndarray, site: str, *,
                         target: str | None = None) -> np.ndarray:
        """Harmonize a NIfTI-ordered ``(X, Y)`` or ``(X, Y, Z)`` array slice by slice (axial)."""
        arr = np.asarray(volume, dtype=np.float32)
        if arr.ndim == 2:
            return self.transform(arr, site, target=target)
        if arr.ndim == 4 and arr.shape[3] == 1:
            arr = arr[..., 0]
        if arr.ndim != 3:
            raise HarmonizeError(f"{self.method}: expected a 2-D or 3-D image, got shape "
                                 f"{np.shape(volume)}")
        out = self.transform(np.moveaxis(arr, 2, 0), site, target=target)
        return np.moveaxis(out, 0, 2).reshape(np.shape(volume))

    def _image_state(self) -> dict[str, Any]:
        return {"sites": self.sites_, "scales": self.scales_, "target_site": self.target_site}

    def _restore_image_state(self, state: dict[str, Any]) -> None:
        self.sites_ = list(state["sites"])
        self.scales_ = {str(k): float(v) for k, v in state["scales"].items()}
        self.target_site = state["target_site"]
