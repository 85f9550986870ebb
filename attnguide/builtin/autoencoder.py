"""A linear patch autoencoder: the built-in model's latent space.

Every 4x4x3 patch of an image is projected onto the leading principal components of such patches
(fitted on rendered scenes, no training) and each component is whitened to unit variance; decoding
is the transposed projection. At 8 components the 16x16x8 latent keeps the outline of even the
small shapes (measured by ``attnguide evaluator accuracy --through-vae``), which a small trained
convolutional VAE did not. Patchified pixel-space latents are a published design for diffusion.

The class has AutoencoderKL's interface (``encode().latent_dist``, ``decode().sample``,
``config.scaling_factor``/``latent_channels``/``block_out_channels``), so diffusers' Stable
Diffusion pipelines, img2img and inpainting included, use it unchanged.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

__all__ = ["PatchAutoencoder", "fit_patch_autoencoder", "ModelMixin"]


class PatchAutoencoder(ModelMixin, ConfigMixin):
    """Encode non-overlapping ``patch_size``² patches linearly into ``latent_channels`` values.

    ``block_out_channels`` only tells diffusers' pipelines the spatial factor
    (``2 ** (len(block_out_channels) - 1) == patch_size``); it sizes nothing here.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 8,
        patch_size: int = 4,
        scaling_factor: float = 1.0,
        block_out_channels: tuple[int, ...] = (1, 1, 1),
        force_upcast: bool = False,
    ) -> None:
        super().__init__()
        if 2 ** (len(block_out_channels) - 1) != patch_size:
            raise ValueError(f"block_out_channels must have log2(patch_size) + 1 = {int(np.log2(patch_size)) + 1} entries")
        dim = in_channels * patch_size * patch_size
        self.components = torch.nn.Parameter(torch.zeros(latent_channels, dim), requires_grad=False)  # rows: whitened projections
        self.inverse = torch.nn.Parameter(torch.zeros(latent_channels, dim), requires_grad=False)  # rows: decoding directions
        self.mean = torch.nn.Parameter(torch.zeros(dim), requires_grad=False)  # mean patch

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        c = self.config
        return rows.view(c.latent_channels, c.in_channels, c.patch_size, c.patch_size)

    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/p, W/p): z = W(x − μ) per patch."""
        c = self.config
        bias = -(self.components @ self.mean)
        return F.conv2d(images, self._kernel(self.components), bias=bias, stride=c.patch_size)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        mean = self.encode_mean(x)
        # Zero variance: sampling returns the mean (log-variance −30 is exp(−15) ≈ 3e-7 of std).
        dist = DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, -30.0)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None, **kwargs):
        c = self.config
        images = F.conv_transpose2d(z, self._kernel(self.inverse), stride=c.patch_size)
        images = images + self.mean.view(c.in_channels, c.patch_size, c.patch_size).repeat(
            1, z.shape[-2], z.shape[-1]
        )
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        return self.decode(self.encode_mean(sample), return_dict=return_dict)


def _patches(images: np.ndarray, patch: int) -> np.ndarray:
    """(n, 3, H, W) -> (n * H/p * W/p, 3 * p * p), channel-major as conv2d's kernel."""
    n, ch, h, w = images.shape
    x = images.reshape(n, ch, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(-1, ch * patch * patch)


def fit_patch_autoencoder(images: np.ndarray, latent_channels: int = 8, patch_size: int = 4) -> PatchAutoencoder:
    """PCA of the images' patches: the leading ``latent_channels`` components, each whitened to
    unit variance (so every latent channel is as loud as the others for the diffusion noise)."""
    x = _patches(images.astype(np.float64), patch_size)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    std = s[:latent_channels] / np.sqrt(len(x))
    components = vt[:latent_channels] / std[:, None]
    inverse = vt[:latent_channels] * std[:, None]
    model = PatchAutoencoder(
        in_channels=images.shape[1], latent_channels=latent_channels, patch_size=patch_size,
        block_out_channels=(1,) * (int(np.log2(patch_size)) + 1),
    )
    with torch.no_grad():
        model.components.copy_(torch.from_numpy(components))
        model.inverse.copy_(torch.from_numpy(inverse))
        model.mean.copy_(torch.from_numpy(mean))
    return model
