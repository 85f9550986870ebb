"""Rows of the denoiser's batch: which rows a rebuilt batch takes, for every per-row input.

The engine rebuilds the batch a pipeline sends (``[uncond, cond]`` or ``[cond]``) into the branches
a step needs; every tensor whose leading dimension is the pipeline's batch follows the same rows.
"""
from __future__ import annotations

from typing import Any

import torch


def map_rows(value: Any, index: torch.Tensor, batch: int, frames: int = 1) -> Any:
    """Take rows ``index`` of every tensor whose leading dimension is the pipeline's batch,
    inside lists, tuples and dicts too (ControlNet residuals, added_cond_kwargs, IP-Adapter embeds).

    For a video U-Net (``frames`` > 1) a tensor with ``batch * frames`` rows is per frame, video-major
    (AnimateDiff's ``encoder_hidden_states`` are repeat-interleaved per frame by the pipeline): the
    rows of every frame of the chosen videos are taken."""
    if torch.is_tensor(value):
        if value.ndim > 0 and value.shape[0] == batch:
            return value.index_select(0, index.to(value.device))
        if frames > 1 and value.ndim > 0 and value.shape[0] == batch * frames:
            per_frame = (index[:, None] * frames + torch.arange(frames)).reshape(-1)
            return value.index_select(0, per_frame.to(value.device))
        return value
    if isinstance(value, dict):
        return {k: map_rows(v, index, batch, frames) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        mapped = [map_rows(v, index, batch, frames) for v in value]
        return type(value)(mapped) if isinstance(value, list) or type(value) is tuple else mapped
    return value


def frames_as_rows(x: torch.Tensor) -> torch.Tensor:
    """Video predictions (B, C, F, H, W) -> (B·F, C, H, W), rows in the order the U-Net's spatial
    attention sees them (video-major), so S-CFG segments and guides every frame on its own."""
    if x.ndim != 5:
        return x
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def rows_as_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """The inverse of ``frames_as_rows``."""
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)
