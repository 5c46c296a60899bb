"""PyTorch networks and losses of the learned image harmonizers.

This module imports :mod:`torch` at the top: only the methods of the harmonizer classes
(``fit``, ``transform``, ``_restore``) import it, so :mod:`.paired`, :mod:`.unpaired`
and :mod:`.disentangle` import without the ``learn`` extra.

Images are ``(batch, channels, H, W)`` float32 tensors, each image scaled by its own
robust maximum (:func:`mrharmony.harmonize.learned.data.robust_scale`), so intensities
are about 0..1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ContrastEncoder", "ConvBlock", "PatchDiscriminator", "ResnetGenerator", "UNet",
           "l1_ssim_loss",
           "ssim"]


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by instance normalisation and a LeakyReLU."""

    def __init__(self, c_in: int, c_out: int, *, norm: bool = True) -> None:
        layers: list[nn.Module] = []
        for c in (c_in, c_out):
            layers.append(nn.Conv2d(c, c_out, 3, padding=1, bias=not norm))
            if norm:
                layers.append(nn.InstanceNorm2d(c_out, affine=True))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
        super().__init__(*layers)


class UNet(nn.Module):
    """A U-Net (Ronneberger et al. 2015): ``depth`` poolings, channels doubling per level,
    skip connections by concatenation, a 1x1 output convolution.

    Parameters
    ----------
    c_in, c_out : int
        Input and output channels.
    base : int
        Channels of the first level.
    depth : int
        Number of 2x down-samplings (H and W must be divisible by ``2**depth``; callers
        pad).
    residual : bool
        Add the first input channel to the output (the network learns a correction of
        the input image, as DeepHarmony's final skip connection).
    norm : bool
        Instance normalisation in the blocks. Off for a network conditioned by constant
        input channels (CALAMITI's decoder gets theta broadcast over the image: instance
        normalisation would subtract it away).
    """

    def __init__(self, c_in: int, c_out: int, *, base: int = 16, depth: int = 3,
                 residual: bool = False, norm: bool = True) -> None:
        super().__init__()
        self.depth, self.residual = depth, residual
        chans = [base * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c = c_in
        for ch in chans:
            self.down.append(ConvBlock(c, ch, norm=norm))
            c = ch
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for ch in reversed(chans[:-1]):
            self.up.append(nn.ConvTranspose2d(c, ch, 2, stride=2))
            self.merge.append(ConvBlock(2 * ch, ch, norm=norm))
            c = ch
        self.out = nn.Conv2d(c, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for i, block in enumerate(self.down):
            h = block(h)
            if i < self.depth:
                skips.append(h)
                h = F.max_pool2d(h, 2)
        for up, merge in zip(self.up, self.merge, strict=True):
            h = up(h)
            h = merge(torch.cat([h, skips.pop()], dim=1))
        y = self.out(h)
        if self.residual:
            y = y + x[:, :1]
        return y


class ResnetGenerator(nn.Module):
    """CycleGAN generator (Zhu et al. 2017): conv 7x7, two stride-2 convolutions, residual
    blocks, two transposed convolutions, conv 7x7 (here a ReLU output: intensities >= 0)."""

    def __init__(self, c_in: int = 1, c_out: int = 1, *, base: int = 16,
                 n_blocks: int = 3) -> None:
        super().__init__()

        def conv(ci: int, co: int, k: int, s: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(ci, co, k, stride=s, padding=k // 2, padding_mode="reflect"
                              if k > 1 else "zeros"),
                    nn.InstanceNorm2d(co, affine=True), nn.ReLU(inplace=True)]

        layers = conv(c_in, base, 7) + conv(base, 2 * base, 3, 2) + conv(2 * base, 4 * base,
                                                                        3, 2)
        self.head = nn.Sequential(*layers)
        self.blocks = nn.ModuleList(
            nn.Sequential(*conv(4 * base, 4 * base, 3), nn.Conv2d(4 * base, 4 * base, 3,
                                                                   padding=1,
                                                                   padding_mode="reflect"),
                          nn.InstanceNorm2d(4 * base, affine=True))
            for _ in range(n_blocks))
        self.tail = nn.Sequential(
            nn.ConvTranspose2d(4 * base, 2 * base, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(2 * base, affine=True), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * base, base, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(base, affine=True), nn.ReLU(inplace=True),
            nn.Conv2d(base, c_out, 7, padding=3, padding_mode="reflect"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        for block in self.blocks:
            h = h + block(h)
        return F.relu(self.tail(h))


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017): stride-2 convolutions, one real/fake
    score per receptive-field patch (LSGAN: no sigmoid)."""

    def __init__(self, c_in: int = 1, *, base: int = 16, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(c_in, base, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        c = base
        for i in range(1, n_layers):
            co = base * 2 ** i
            layers += [nn.Conv2d(c, co, 4, stride=2 if i < n_layers - 1 else 1, padding=1),
                       nn.InstanceNorm2d(co, affine=True), nn.LeakyReLU(0.2, inplace=True)]
            c = co
        layers.append(nn.Conv2d(c, 1, 4, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContrastEncoder(nn.Module):
    """CALAMITI's contrast (theta) encoder: stride-2 convolutions, global average
    pooling and a linear layer to the mean and log-variance of a ``dim``-vector (a VAE
    posterior ``q(theta | x)``)."""

    def __init__(self, c_in: int = 1, *, dim: int = 2, base: int = 8,
                 n_layers: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = c_in
        for i in range(n_layers):
            co = base * 2 ** i
            layers += [nn.Conv2d(c, co, 3, stride=2, padding=1),
                       nn.LeakyReLU(0.2, inplace=True)]
            c = co
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(c, 2 * dim)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(x).mean(dim=(-2, -1))
        mu, logvar = self.head(h).split(self.dim, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(ax ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, size: int = 7,
         sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004; Gaussian window) of image batches.

    Parameters
    ----------
    x, y : torch.Tensor
        ``(B, C, H, W)``.
    data_range : float
        Intensity range (constants ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``).

    Returns
    -------
    torch.Tensor
        Scalar mean SSIM.
    """
    c = x.shape[1]
    w = _gaussian_window(size, sigma, x.device).expand(c, 1, size, size)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx = F.conv2d(x, w, groups=c)
    my = F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mx ** 2
    syy = F.conv2d(y * y, w, groups=c) - my ** 2
    sxy = F.conv2d(x * y, w, groups=c) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.mean()


def l1_ssim_loss(pred: torch.Tensor, target: torch.Tensor, *, ssim_weight: float = 0.0
                 ) -> torch.Tensor:
    """``(1 - w) * L1 + w * (1 - SSIM)`` (DeepHarmony's loss: L1, optionally with SSIM)."""
    loss = F.l1_loss(pred, target)
    if ssim_weight > 0:
        loss = (1 - ssim_weight) * loss + ssim_weight * (1 - ssim(pred, target))
    return loss
