"""Unpaired image harmonization: a CycleGAN-style two-site translator.

CycleGAN (Zhu et al. 2017, ICCV; for MRI harmonization e.g. Modanwal et al. 2020)
learns two generators, ``G_AB`` (source domain A -> target site B) and ``G_BA``, from
images of the two sites that are *not* of the same subjects. Two PatchGAN
discriminators ``D_A`` and ``D_B`` tell real images of a site from translated ones.
Generator loss (least-squares GAN, LSGAN)::

    L_G = (D_B(G_AB(a)) - 1)^2 + (D_A(G_BA(b)) - 1)^2
          + lambda_cycle * (|G_BA(G_AB(a)) - a|_1 + |G_AB(G_BA(b)) - b|_1)
          + lambda_identity * lambda_cycle * (|G_AB(b) - b|_1 + |G_BA(a) - a|_1)

discriminator loss ``0.5 ((D(real) - 1)^2 + D(fake)^2)`` per site; Adam (lr 2e-4,
betas 0.5, 0.999), as the paper (lambda_cycle 10, identity weight 0.5).

Unpaired training: every epoch the source images are shuffled and each batch is given
target-site images drawn independently at random, so the traveling-subject pairing of
the toolkit's datasets is never used (the validation loss uses no pairing either).

Early stopping: the validation loss is the cycle + identity loss (the weighted L1 terms
above) on the ``validation`` split. The adversarial losses are not a stopping criterion
(a GAN's losses oscillate and do not measure translation quality), so the kept epoch is
the one whose generators are most cycle-consistent; ``min_epochs`` epochs run before
early stopping may end training (a generator close to the identity, early in training,
is trivially cycle-consistent).

Deviations from the paper: small generators (``base`` 16, 6 residual blocks; quick: 8
channels, 3 blocks) and discriminators (3 layers, 32 channels; quick 16) for 2-D 64-128
pixel slices; a ReLU output (magnitude images are >= 0) instead of tanh; no history pool
of generated images for the discriminators; a constant learning rate (the paper decays
it linearly to 0 over its second half); the source domain may pool several sites
(``source_site=None``: every site but the target), translated by one generator.
Networks are in :mod:`.nets`, imported only inside the methods, so this module imports
without PyTorch.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from mrharmony.errors import HarmonizeError

from . import require_torch
from .base import LearnedImageHarmonizer, run_epochs, seed_all
from .model_file import fingerprint

__all__ = ["CycleGAN"]


class CycleGAN(LearnedImageHarmonizer):
    """CycleGAN-style unpaired translation between a source and a target site.

    ``transform(images, site)`` maps source-site images to the target site (``G_AB``);
    ``transform(images, target_site, target=source)`` maps back (``G_BA``).

    Parameters
    ----------
    source_site : str, optional
        The source site (domain A). Default: every training site except the target,
        pooled into one domain.
    base, n_blocks : int
        Generator channels (first level) and residual blocks.
    disc_base, disc_layers : int
        PatchGAN discriminator channels and stride layers.
    lambda_cycle, lambda_identity : float
        Weight of the cycle loss, and of the identity loss relative to it.
    beta1 : float
        Adam's first-moment decay (the paper: 0.5; second moment 0.999).
    min_epochs : int
        Epochs before early stopping may end training.
    **kwargs
        :class:`~mrharmony.harmonize.learned.base.LearnedImageHarmonizer` options
        (``target_site``, ``contrast``, ``epochs``, ``batch_size``, ``lr`` (default
        2e-4), ``patience``, ``seed``, ``device``).
    """

    method: ClassVar[str] = "cyclegan"
    QUICK: ClassVar[dict[str, Any]] = {"base": 8, "n_blocks": 3, "disc_base": 16,
                                       "epochs": 200, "batch_size": 4, "patience": 40,
                                       "min_epochs": 60}

    def __init__(self, *, source_site: str | None = None, base: int = 16, n_blocks: int = 6,
                 disc_base: int = 32, disc_layers: int = 3, lambda_cycle: float = 10.0,
                 lambda_identity: float = 0.5, beta1: float = 0.5, min_epochs: int = 0,
                 **kwargs: Any) -> None:
        kwargs.setdefault("lr", 2e-4)
        kwargs.setdefault("batch_size", 4)
        super().__init__(**kwargs)
        if min(base, n_blocks, disc_base, disc_layers) < 1:
            raise HarmonizeError("cyclegan: base, n_blocks, disc_base, disc_layers must be >= 1")
        if lambda_cycle < 0 or lambda_identity < 0 or not 0 <= beta1 < 1 or min_epochs < 0:
            raise HarmonizeError("cyclegan: lambdas >= 0, 0 <= beta1 < 1, min_epochs >= 0")
        self.source_site = source_site
        self.base, self.n_blocks = int(base), int(n_blocks)
        self.disc_base, self.disc_layers = int(disc_base), int(disc_layers)
        self.lambda_cycle, self.lambda_identity = float(lambda_cycle), float(lambda_identity)
        self.beta1, self.min_epochs = float(beta1), int(min_epochs)
        self.size_multiple = 4
        self.sources_: list[str] = []
        self.g_ab_: Any = None
        self.g_ba_: Any = None

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "source_site": self.source_site, "base": self.base,
                "n_blocks": self.n_blocks, "disc_base": self.disc_base,
                "disc_layers": self.disc_layers, "lambda_cycle": self.lambda_cycle,
                "lambda_identity": self.lambda_identity, "beta1": self.beta1,
                "min_epochs": self.min_epochs}

    def _build(self) -> None:
        from .nets import ResnetGenerator

        dev = self.torch_device
        self.g_ab_ = ResnetGenerator(1, 1, base=self.base, n_blocks=self.n_blocks).to(dev)
        self.g_ba_ = ResnetGenerator(1, 1, base=self.base, n_blocks=self.n_blocks).to(dev)

    def _domain(self, data: Any, sites: list[str], split: str) -> Any:
        torch = require_torch()
        rows = data.rows(contrast=self.contrast, split=split, site=sites)
        if rows.size == 0:
            return torch.empty(0, 1, 0, 0)
        return self._pad(torch.from_numpy(self._normalised(data.images[rows]))[:, None])[0]

    def cycle_identity_loss(self, a: Any, b: Any) -> Any:
        """Weighted cycle + identity L1 loss of batches ``a`` (source) and ``b`` (target).

        The two batches need not be of the same subjects nor of the same size (each term
        is a mean over its own batch); an empty batch contributes nothing.
        """
        torch = require_torch()
        import torch.nn.functional as F

        loss = torch.zeros((), device=a.device if len(a) else b.device)
        lc, li = self.lambda_cycle, self.lambda_identity * self.lambda_cycle
        if len(a):
            loss = loss + lc * F.l1_loss(self.g_ba_(self.g_ab_(a)), a) \
                + li * F.l1_loss(self.g_ba_(a), a)
        if len(b):
            loss = loss + lc * F.l1_loss(self.g_ab_(self.g_ba_(b)), b) \
                + li * F.l1_loss(self.g_ab_(b), b)
        return loss

    def fit(self, data: Any, *, progress: bool = False) -> CycleGAN:
        """Train on the ``train`` split's images of the two domains (unpaired).

        Parameters
        ----------
        data : ImageDataset
            Images with ``site``, ``contrast`` and ``split`` columns.
        progress : bool
            Show a progress bar.

        Returns
        -------
        CycleGAN
            ``self``; ``training_`` holds the generator, discriminator and validation
            losses per epoch.

        Raises
        ------
        HarmonizeError
            An unknown source or target site, the source equal to the target, or a domain
            without training images.
        """
        torch = require_torch()
        import torch.nn.functional as F

        from .nets import PatchDiscriminator

        seed_all(self.seed)
        target = self._resolve_sites(data, need_pairs=False)
        if self.source_site is None:
            self.sources_ = [s for s in self.sites_ if s != target]
        elif self.source_site not in self.sites_:
            raise HarmonizeError(f"cyclegan: source site {self.source_site!r} not in the data "
                                 f"(sites: {', '.join(self.sites_)})")
        elif self.source_site == target:
            raise HarmonizeError(f"cyclegan: source and target site are both {target!r}")
        else:
            self.sources_ = [self.source_site]
        a, b = self._domain(data, self.sources_, "train"), self._domain(data, [target], "train")
        av, bv = (self._domain(data, self.sources_, "validation"),
                  self._domain(data, [target], "validation"))
        dev = self.torch_device
        self._build()
        d_a = PatchDiscriminator(1, base=self.disc_base, n_layers=self.disc_layers).to(dev)
        d_b = PatchDiscriminator(1, base=self.disc_base, n_layers=self.disc_layers).to(dev)
        betas = (self.beta1, 0.999)
        opt_g = torch.optim.Adam([*self.g_ab_.parameters(), *self.g_ba_.parameters()],
                                 lr=self.lr, betas=betas)
        opt_d = torch.optim.Adam([*d_a.parameters(), *d_b.parameters()], lr=self.lr,
                                 betas=betas)
        gen = torch.Generator().manual_seed(self.seed)
        history: dict[str, list[float]] = {"adversarial": [], "cycle_identity": [],
                                           "discriminator": []}

        def lsgan(pred: Any, real: bool) -> Any:
            return F.mse_loss(pred, torch.full_like(pred, 1.0 if real else 0.0))

        def epoch(_: int) -> float:
            sums = np.zeros(3)
            n_batches = 0
            for idx in self._batches(len(a), gen):
                # unpaired: target images drawn independently of the source batch
                jdx = torch.randint(len(b), (len(idx),), generator=gen)
                ra, rb = self._flip(gen, a[idx])[0].to(dev), self._flip(gen, b[jdx])[0].to(dev)
                fake_b, fake_a = self.g_ab_(ra), self.g_ba_(rb)
                for p in (*d_a.parameters(), *d_b.parameters()):
                    p.requires_grad_(False)
                adv = lsgan(d_b(fake_b), True) + lsgan(d_a(fake_a), True)
                lc = self.lambda_cycle
                li = self.lambda_identity * lc
                cyc = (lc * (F.l1_loss(self.g_ba_(fake_b), ra) + F.l1_loss(self.g_ab_(fake_a), rb))
                       + li * (F.l1_loss(self.g_ab_(rb), rb) + F.l1_loss(self.g_ba_(ra), ra)))
                opt_g.zero_grad()
                (adv + cyc).backward()
                opt_g.step()
                for p in (*d_a.parameters(), *d_b.parameters()):
                    p.requires_grad_(True)
                loss_d = 0.5 * (lsgan(d_b(rb), True) + lsgan(d_b(fake_b.detach()), False)
                                + lsgan(d_a(ra), True) + lsgan(d_a(fake_a.detach()), False))
                opt_d.zero_grad()
                loss_d.backward()
                opt_d.step()
                sums += [float(adv.detach()), float(cyc.detach()), float(loss_d.detach())]
                n_batches += 1
            means = sums / n_batches
            for k, v in zip(history, means, strict=True):
                history[k].append(float(v))
            return float(means[0] + means[1])

        def validate() -> float:
            with torch.no_grad():
                return float(self.cycle_identity_loss(av.to(dev), bv.to(dev)))

        has_val = len(av) > 0 or len(bv) > 0
        log = run_epochs(epoch, epochs=self.epochs, validate=validate if has_val else None,
                         modules=(self.g_ab_, self.g_ba_), patience=self.patience,
                         progress=progress, desc="cyclegan", min_epochs=self.min_epochs)
        self.training_ = {"fingerprint": fingerprint(a, b, self.sources_, [target]),
                          "seed": self.seed, "source_sites": self.sources_,
                          "source_images": len(a), "target_images": len(b),
                          "validation_images": len(av) + len(bv),
                          "epochs_run": len(log.train_loss), **log.as_dict(),
                          "losses": history,
                          "validation": "cycle + identity loss (adversarial losses are "
                                        "not a stopping criterion)"}
        return self

    def _forward(self, x: Any, site: str, target: str) -> Any:
        if site == target:
            return x
        if site in self.sources_ and target == self.target_site:
            return self.g_ab_(x)
        if site == self.target_site and target in self.sources_:
            return self.g_ba_(x)
        raise HarmonizeError(f"cyclegan: this model translates between "
                             f"{', '.join(self.sources_)} and {self.target_site!r} only (not "
                             f"{site!r} -> {target!r})")

    def _export(self) -> tuple[dict[str, Any], dict[str, Any]]:
        tensors = {f"g_ab.{k}": v for k, v in self.g_ab_.state_dict().items()}
        tensors.update({f"g_ba.{k}": v for k, v in self.g_ba_.state_dict().items()})
        return {**self._image_state(), "sources": self.sources_}, tensors

    def _restore(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        self._restore_image_state(state)
        self.sources_ = list(state["sources"])
        self._build()
        for name, net in (("g_ab.", self.g_ab_), ("g_ba.", self.g_ba_)):
            net.load_state_dict({k[len(name):]: v for k, v in tensors.items()
                                 if k.startswith(name)})
            net.eval()
