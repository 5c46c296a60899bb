"""Paired image harmonizers, trained on traveling subjects: DeepHarmony and MISPEL.

Both learn from images of the same subject (and slice) at several sites, which the
toolkit simulates (``mrharmony harmonize dataset``). Networks are in :mod:`.nets`,
imported only inside the methods, so this module imports without PyTorch.

DeepHarmony (Dewey et al. 2019, MRM 82:2185)
    A U-Net maps a source-site image to the same subject's image at the target site,
    trained with an L1 loss on traveling-subject pairs (the paper: L1; here optionally
    ``(1 - w) L1 + w (1 - SSIM)``). Deviations: the paper's U-Net takes four contrasts
    (T1w, FLAIR, PD, T2w) at 256x256 and has four poolings with 64..1024 channels, and
    one network is trained per source-target direction; here one contrast, three
    poolings with 16..128 channels (quick: two poolings, 8..32), one network for every
    source site with the source site given as one-hot input channels, and the final skip
    adds the input image (the network learns the site difference).

MISPEL (Torbati et al. 2023, Med. Image Anal. 89:102926)
    One encoder (a U-Net) and one linear decoder (1x1 convolution) per site with a
    shared embedding of ``embedding`` channels. Step 1 trains encoders and decoders
    with the reconstruction loss ``|D_i(E_i(x_i)) - x_i|_1`` plus ``lambda_embed`` times
    the embedding similarity loss (mean absolute difference between the embeddings of
    the same subject's images at different sites). Step 2 freezes the encoders and
    trains the decoders. Deviation: the paper's step 2 minimises the differences between
    the decoded images of all scanners (harmonized images lie between the sites); here,
    with the paired target images known, the decoders are trained so that
    ``D_j(E_i(x_i))`` reproduces ``x_j`` for every site pair (i = j: reconstruction),
    and harmonizing to site ``t`` is ``D_t(E_s(x_s))``. Sizes: embedding 6 channels as
    the paper, encoder U-Net with 3 poolings and 16..128 channels (quick: 2, 8..32);
    the paper's encoder is a 4-level U-Net with 64 base channels.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from mrharmony.errors import HarmonizeError

from . import require_torch
from .base import LearnedImageHarmonizer, run_epochs, seed_all
from .model_file import fingerprint

__all__ = ["DeepHarmony", "Mispel"]


class DeepHarmony(LearnedImageHarmonizer):
    """DeepHarmony-style U-Net from every source site to one target site (paired).

    Parameters
    ----------
    base, depth : int
        Channels of the first U-Net level and number of poolings.
    ssim_weight : float
        Weight ``w`` of ``1 - SSIM`` in the loss ``(1 - w) L1 + w (1 - SSIM)``; 0: L1.
    **kwargs
        :class:`~mrharmony.harmonize.learned.base.LearnedImageHarmonizer` options
        (``target_site``, ``contrast``, ``epochs``, ``batch_size``, ``lr``, ``patience``,
        ``seed``, ``device``).
    """

    method: ClassVar[str] = "deepharmony"
    QUICK: ClassVar[dict[str, Any]] = {"base": 8, "depth": 2, "epochs": 60, "patience": 15}

    def __init__(self, *, base: int = 16, depth: int = 3, ssim_weight: float = 0.2,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if base < 1 or depth < 1:
            raise HarmonizeError("deepharmony: base and depth must be >= 1")
        if not 0 <= ssim_weight <= 1:
            raise HarmonizeError("deepharmony: ssim_weight must be in [0, 1]")
        self.base, self.depth, self.ssim_weight = int(base), int(depth), float(ssim_weight)
        self.size_multiple = 2 ** self.depth
        self.net_: Any = None

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "base": self.base, "depth": self.depth,
                "ssim_weight": self.ssim_weight}

    def _build(self) -> Any:
        from .nets import UNet

        return UNet(1 + len(self.sites_), 1, base=self.base, depth=self.depth,
                    residual=True).to(self.torch_device)

    def _inputs(self, x: Any, site_index: Any) -> Any:
        """Image channel plus one-hot source-site channels."""
        torch = require_torch()
        onehot = torch.nn.functional.one_hot(site_index, len(self.sites_)).to(x.dtype)
        return torch.cat([x, onehot[:, :, None, None].expand(-1, -1, *x.shape[-2:])], 1)

    def _pairs(self, data: Any, split: str) -> tuple[Any, Any, Any]:
        torch = require_torch()
        xs, ys, idx = [], [], []
        for k, src in enumerate(self.sites_):
            if src == self.target_site:
                continue
            p = data.paired([src, self.target_site], contrast=self.contrast, split=split)
            if len(p):
                xs.append(self._normalised(data.images[p[:, 0]]))
                ys.append(self._normalised(data.images[p[:, 1]]))
                idx.append(np.full(len(p), k))
        if not xs:
            return torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long)
        x = torch.from_numpy(np.concatenate(xs))[:, None]
        y = torch.from_numpy(np.concatenate(ys))[:, None]
        return self._pad(x)[0], self._pad(y)[0], torch.from_numpy(np.concatenate(idx))

    def fit(self, data: Any, *, progress: bool = False) -> DeepHarmony:
        """Train on the ``train`` split's pairs (early stopping on ``validation``).

        Parameters
        ----------
        data : ImageDataset
            From :func:`~mrharmony.harmonize.learned.data.load_dataset` (or
            :meth:`~mrharmony.harmonize.learned.data.ImageDataset.from_arrays`).
        progress : bool
            Show a progress bar.

        Returns
        -------
        DeepHarmony
            ``self``.

        Raises
        ------
        HarmonizeError
            No paired training images, an unknown target site or contrast.
        """
        torch = require_torch()
        from .nets import l1_ssim_loss

        seed_all(self.seed)
        self._resolve_sites(data)
        x, y, s = self._pairs(data, "train")
        if len(x) == 0:
            raise HarmonizeError(f"deepharmony: no subject imaged at a source site and at "
                                 f"the target site {self.target_site!r} in the train split")
        xv, yv, sv = self._pairs(data, "validation")
        dev = self.torch_device
        self.net_ = self._build()
        opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)

        def epoch(_: int) -> float:
            total = 0.0
            for b in self._batches(len(x), gen):
                xb, yb = self._flip(gen, x[b], y[b])
                pred = self.net_(self._inputs(xb.to(dev), s[b].to(dev)))
                loss = l1_ssim_loss(pred, yb.to(dev), ssim_weight=self.ssim_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(b)
            return total / len(x)

        def validate() -> float:
            with torch.no_grad():
                pred = self.net_(self._inputs(xv.to(dev), sv.to(dev)))
                return float(l1_ssim_loss(pred, yv.to(dev), ssim_weight=self.ssim_weight))

        log = run_epochs(epoch, epochs=self.epochs, validate=validate if len(xv) else None,
                         modules=(self.net_,), patience=self.patience, progress=progress,
                         desc="deepharmony")
        self.training_ = {"fingerprint": fingerprint(x, y, s), "seed": self.seed,
                          "pairs": len(x), "validation_pairs": len(xv),
                          "epochs_run": len(log.train_loss), **log.as_dict()}
        return self

    def _forward(self, x: Any, site: str, target: str) -> Any:
        torch = require_torch()
        if target != self.target_site:
            raise HarmonizeError(f"deepharmony: this model harmonizes to "
                                 f"{self.target_site!r} only (not {target!r})")
        if site == self.target_site:
            return x
        s = torch.full((len(x),), self.sites_.index(site), dtype=torch.long, device=x.device)
        return self.net_(self._inputs(x, s))

    def _export(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self._image_state(), dict(self.net_.state_dict())

    def _restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        self._restore_image_state(state)
        self.net_ = self._build()
        self.net_.load_state_dict(tensors)
        self.net_.eval()


class Mispel(LearnedImageHarmonizer):
    """MISPEL: site-specific encoders and linear decoders with a shared embedding (paired).

    Parameters
    ----------
    embedding : int
        Channels of the shared embedding (the paper: 6).
    base, depth : int
        Encoder U-Net size.
    lambda_embed : float
        Weight of the embedding similarity loss in step 1.
    step2_epochs : int, optional
        Epochs of step 2 (default: ``epochs // 2``).
    **kwargs
        :class:`~mrharmony.harmonize.learned.base.LearnedImageHarmonizer` options.
    """

    method: ClassVar[str] = "mispel"
    # 50 + 40 epochs left step 1 still improving (SSIM 0.27 on the quick dataset's
    # held-out subject, worse than no harmonization); 300 + 200 reach 0.83 (docs/learned.md)
    QUICK: ClassVar[dict[str, Any]] = {"base": 8, "depth": 2, "epochs": 300,
                                       "step2_epochs": 200, "patience": 30}

    def __init__(self, *, embedding: int = 6, base: int = 16, depth: int = 3,
                 lambda_embed: float = 1.0, step2_epochs: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if embedding < 1 or base < 1 or depth < 1 or lambda_embed < 0:
            raise HarmonizeError("mispel: embedding, base, depth >= 1, lambda_embed >= 0")
        self.embedding, self.base, self.depth = int(embedding), int(base), int(depth)
        self.lambda_embed = float(lambda_embed)
        self.step2_epochs = None if step2_epochs is None else int(step2_epochs)
        self.size_multiple = 2 ** self.depth
        self.encoders_: Any = None
        self.decoders_: Any = None

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "embedding": self.embedding, "base": self.base,
                "depth": self.depth, "lambda_embed": self.lambda_embed,
                "step2_epochs": self.step2_epochs}

    def _build(self) -> None:
        torch = require_torch()
        from .nets import UNet

        n = len(self.sites_)
        self.encoders_ = torch.nn.ModuleList(
            UNet(1, self.embedding, base=self.base, depth=self.depth) for _ in range(n)
        ).to(self.torch_device)
        self.decoders_ = torch.nn.ModuleList(
            torch.nn.Conv2d(self.embedding, 1, 1) for _ in range(n)).to(self.torch_device)

    def _tuples(self, data: Any, split: str) -> Any:
        torch = require_torch()
        p = data.paired(self.sites_, contrast=self.contrast, split=split)
        if len(p) == 0:
            return torch.empty(0)
        x = np.stack([self._normalised(data.images[p[:, k]]) for k in range(p.shape[1])], 1)
        return self._pad(torch.from_numpy(x))[0]  # (n, sites, H, W)

    def fit(self, data: Any, *, progress: bool = False) -> Mispel:
        """Train steps 1 and 2 on subjects imaged at every site (see the module docstring).

        Returns
        -------
        Mispel
            ``self``.

        Raises
        ------
        HarmonizeError
            No subject of the train split imaged at every site.
        """
        torch = require_torch()
        import torch.nn.functional as F

        seed_all(self.seed)
        self._resolve_sites(data)
        x = self._tuples(data, "train")
        if len(x) == 0:
            raise HarmonizeError(f"mispel: no subject of the train split imaged at every "
                                 f"site ({', '.join(self.sites_)})")
        xv = self._tuples(data, "validation")
        dev = self.torch_device
        n_sites = len(self.sites_)
        self._build()
        gen = torch.Generator().manual_seed(self.seed)

        def embed(xb: Any) -> list[Any]:
            return [self.encoders_[k](xb[:, k:k + 1]) for k in range(n_sites)]

        def step1_loss(xb: Any) -> Any:
            z = embed(xb)
            rec = sum(F.l1_loss(self.decoders_[k](z[k]), xb[:, k:k + 1])
                      for k in range(n_sites)) / n_sites
            pairs = [(i, j) for i in range(n_sites) for j in range(i + 1, n_sites)]
            sim = sum(F.l1_loss(z[i], z[j]) for i, j in pairs) / len(pairs)
            return rec + self.lambda_embed * sim

        def step2_loss(xb: Any) -> Any:
            with torch.no_grad():
                z = embed(xb)
            return sum(F.l1_loss(self.decoders_[j](z[i]), xb[:, j:j + 1])
                       for i in range(n_sites) for j in range(n_sites)) / n_sites ** 2

        def trainer(loss_fn: Any, opt: Any) -> Any:
            def epoch(_: int) -> float:
                total = 0.0
                for b in self._batches(len(x), gen):
                    (xb,) = self._flip(gen, x[b])
                    loss = loss_fn(xb.to(dev))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(b)
                return total / len(x)
            return epoch

        def validator(loss_fn: Any) -> Any:
            def validate() -> float:
                with torch.no_grad():
                    return float(loss_fn(xv.to(dev)))
            return validate if len(xv) else None

        opt1 = torch.optim.Adam([*self.encoders_.parameters(), *self.decoders_.parameters()],
                                lr=self.lr)
        log1 = run_epochs(trainer(step1_loss, opt1), epochs=self.epochs,
                          validate=validator(step1_loss),
                          modules=(self.encoders_, self.decoders_), patience=self.patience,
                          progress=progress, desc="mispel step 1")
        for p in self.encoders_.parameters():
            p.requires_grad_(False)
        opt2 = torch.optim.Adam(self.decoders_.parameters(), lr=self.lr)
        log2 = run_epochs(trainer(step2_loss, opt2),
                          epochs=self.step2_epochs or max(1, self.epochs // 2),
                          validate=validator(step2_loss), modules=(self.decoders_,),
                          patience=self.patience, progress=progress, desc="mispel step 2")
        for p in self.encoders_.parameters():
            p.requires_grad_(True)
        self.encoders_.eval()
        self.training_ = {"fingerprint": fingerprint(x), "seed": self.seed,
                          "tuples": len(x), "validation_tuples": len(xv),
                          "train_loss": log1.train_loss + log2.train_loss,
                          "val_loss": log1.val_loss + log2.val_loss,
                          "step1": log1.as_dict(), "step2": log2.as_dict(),
                          "epochs_run": len(log1.train_loss) + len(log2.train_loss)}
        return self

    def _forward(self, x: Any, site: str, target: str) -> Any:
        s, t = self.sites_.index(site), self.sites_.index(target)
        return self.decoders_[t](self.encoders_[s](x))

    def _export(self) -> tuple[dict[str, Any], dict[str, Any]]:
        tensors = {f"encoders.{k}": v for k, v in self.encoders_.state_dict().items()}
        tensors.update({f"decoders.{k}": v for k, v in self.decoders_.state_dict().items()})
        return self._image_state(), tensors

    def _restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        self._restore_image_state(state)
        self._build()
        enc = {k[len("encoders."):]: v for k, v in tensors.items() if k.startswith("encoders.")}
        dec = {k[len("decoders."):]: v for k, v in tensors.items() if k.startswith("decoders.")}
        self.encoders_.load_state_dict(enc)
        self.decoders_.load_state_dict(dec)
        self.encoders_.eval()
        self.decoders_.eval()
