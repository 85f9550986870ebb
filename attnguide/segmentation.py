"""S-CFG's training-free segmentation and per-region guidance rate (Shen et al., CVPR 2024, Sec. 4).

Pure functions of the attention recorded by the taps: cross-attention maps (N x T per layer) and
the queries/keys of the paired self-attention layers. The self-attention completion S̄·C uses the
head-averaged self-attention matrix S̄ (N x N), formed once per layer and step and reused for every
power, as long as it fits ``SELF_MAP_BUDGET`` bytes (e.g. S-CFG's default 16x16 and 8x8 layers of
SD 1.5 at 512 px); beyond that (e.g. SDXL's 64x64 layers at 1024 px) S̄·X is computed exactly in
blocks of query rows, never holding more than the budget, so memory stays bounded at any resolution.
(``scaled_dot_product_attention`` with C as the values cannot use a fused kernel: C's last dimension,
the token count, differs from the head dimension, so PyTorch falls back to its math path, which
materialises every head's N x N map at once, twice per step.)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .attention import SelfRecord

SELF_MAP_BUDGET = 64 * 2**20  # bytes of float32 attention probabilities held at once by the completion


@functools.lru_cache(maxsize=None)
def _gaussian_kernel64(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k1 = torch.exp(-((x / (2 * sigma)) ** 2))
    kernel = torch.outer(k1, k1)
    return kernel / kernel.sum()


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The reference's smoothing kernel: prod over axes of exp(−((x−μ)/(2σ))²), normalised to sum 1."""
    return _gaussian_kernel64(size, sigma).float()


@functools.lru_cache(maxsize=16)
def _smoothing_weight(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _gaussian_kernel64(3, 0.5).to(device=device, dtype=dtype).view(1, 1, 3, 3)


def smooth(maps: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian smoothing of every channel of (B, C, h, w) maps with reflect padding."""
    b, c, h, w = maps.shape
    flat = maps.reshape(b * c, 1, h, w)
    mode = "reflect" if min(h, w) > 1 else "replicate"  # reflect needs 2+ pixels
    flat = F.pad(flat, (1, 1, 1, 1), mode=mode)
    return F.conv2d(flat, _smoothing_weight(maps.device, maps.dtype)).reshape(b, c, h, w)


def _probabilities(record: SelfRecord, queries: slice, heads: slice) -> torch.Tensor:
    """Softmax attention probabilities of some heads and query rows: (rows, heads, n_q, N)."""
    q = record.query[:, heads, queries]
    logits = torch.matmul(q, record.key[:, heads].transpose(-1, -2))
    return logits.mul_(record.scale).softmax(dim=-1)


def self_attention_map(record: SelfRecord, budget: int = SELF_MAP_BUDGET) -> torch.Tensor | None:
    """The head-averaged self-attention matrix S̄ (rows, N, N), or ``None`` when S̄ itself would
    exceed ``budget`` bytes. Heads are processed in groups so the transient stays within budget."""
    rows, heads, n, _ = record.query.shape
    size = rows * n * n * 4
    if size > budget:
        return None
    group = max(1, min(heads, budget // size))
    total = None
    for start in range(0, heads, group):
        part = _probabilities(record, slice(None), slice(start, start + group)).sum(dim=1)
        total = part if total is None else total.add_(part)
    return total.div_(heads)


def apply_self_attention(record: SelfRecord, values: torch.Tensor, budget: int = SELF_MAP_BUDGET) -> torch.Tensor:
    """S̄·X with S̄ the head-averaged self-attention map, computed in blocks of query rows so that
    no more than ``budget`` bytes of probabilities exist at once (exact, any resolution).

    values: (rows, N, T). Returns (rows, N, T).
    """
    rows, heads, n, _ = record.query.shape
    block = max(1, budget // (rows * heads * n * 4))
    if block >= n:
        return torch.matmul(_probabilities(record, slice(None), slice(None)).mean(dim=1), values)
    out = values.new_empty(rows, n, values.shape[-1])
    for start in range(0, n, block):
        probs = _probabilities(record, slice(start, start + block), slice(None)).mean(dim=1)
        out[:, start:start + block] = torch.matmul(probs, values)
    return out


def complete(cross: torch.Tensor, record: SelfRecord, mode: str, power: int) -> torch.Tensor:
    """Self-attention completion of the cross maps.

    reference: (S̄C + 3·S̄²C) / 4 — what the reference code's loop computes.
    paper: (S̄ + S̄² + … + S̄^R)·C / R — the paper's Eq. (mean of the first R powers).
    """
    s_bar = self_attention_map(record)
    if s_bar is not None:
        apply = functools.partial(torch.bmm, s_bar.to(cross.dtype))
    else:  # too large to hold: recompute S̄ block by block for every power
        apply = functools.partial(apply_self_attention, record)
    x1 = apply(cross)
    if mode == "reference":
        return (x1 + 3 * apply(x1)) / 4
    total, x = x1, x1
    for _ in range(power - 1):
        x = apply(x)
        total = total + x
    return total / power


def grid_shape(tokens: int, latent_hw: tuple[int, int], factor: int) -> tuple[int, int]:
    """The (h, w) of a layer's feature map, checked against its token count."""
    h, w = -(-latent_hw[0] // factor), -(-latent_hw[1] // factor)
    if h * w != tokens:
        raise RuntimeError(f"attention map with {tokens} positions does not fit a {h}x{w} grid (latent {latent_hw}, factor {factor})")
    return h, w


@dataclass
class Segmentation:
    """Per-token regions of one step.

    token_masks: (B, T, h, w) bool, one-hot over tokens (the argmax of the renormalised maps).
    foreground: (B, 1, h, w) bool.
    scores: (B, T, h, w) float, the renormalised, layer-averaged token maps.
    """

    token_masks: torch.Tensor
    foreground: torch.Tensor
    scores: torch.Tensor

    @property
    def labels(self) -> torch.Tensor:
        """(B, h, w) index of the token each pixel is assigned to."""
        return self.scores.argmax(dim=1)


def segment(
    records: dict[str, object],
    pairs: list[tuple[str, str, int]],
    latent_hw: tuple[int, int],
    mode: str,
    power: int,
    smoothing: bool,
    token_rows: slice,
    foreground_rows: slice,
) -> Segmentation:
    """Build S-CFG's masks from recorded attention (steps 2-5 of the method).

    pairs: (self layer, cross layer, downsampling factor) of every recorded transformer block.
    token_rows / foreground_rows: which recorded rows give the token maps and the foreground map
    (reference: conditional and unconditional halves; paper: both conditional).
    """
    finest = min(f for _, _, f in pairs)
    target = grid_shape(-(-latent_hw[0] // finest) * -(-latent_hw[1] // finest), latent_hw, finest)
    token_sum, fore_sum = 0.0, 0.0
    for self_name, cross_name, factor in pairs:
        cross = records[cross_name]
        completed = complete(cross, records[self_name], mode, power)  # (rows, N, T)
        h, w = grid_shape(completed.shape[1], latent_hw, factor)
        maps = completed.transpose(1, 2).reshape(completed.shape[0], -1, h, w)
        if (h, w) != target:
            maps = F.interpolate(maps, size=target, mode="bilinear", align_corners=False)
        if smoothing:
            maps = smooth(maps)
        # Spatial renormalisation: every token gets a chance to win pixels.
        token_sum = token_sum + maps[token_rows] / (maps[token_rows].mean(dim=(2, 3), keepdim=True) + 1e-8)
        fg = maps[foreground_rows]
        fore = torch.stack([fg[:, 0], fg[:, 1:].sum(dim=1)], dim=1)
        tiny = torch.finfo(fore.dtype).tiny  # softmax maps are positive; only guards exact zeros
        fore_sum = fore_sum + fore / fore.mean(dim=(2, 3), keepdim=True).clamp_min(tiny)
    token_scores = token_sum / len(pairs)
    fore_scores = fore_sum / len(pairs)
    token_masks = token_scores == token_scores.max(dim=1, keepdim=True).values
    foreground = ~(fore_scores == fore_scores.max(dim=1, keepdim=True).values)[:, :1]
    return Segmentation(token_masks, foreground, token_scores)


def scfg_rate(
    uncond: torch.Tensor,
    cond: torch.Tensor,
    segmentation: Segmentation,
    guidance_scale: float,
    rate_min: float = 0.8,
    rate_max: float = 3.0,
    cap: float = 15.0,
    smoothing: bool = True,
) -> torch.Tensor:
    """Per-pixel CFG rate (S-CFG step 6): every region is guided as strongly as the foreground.

    rate_i = mean_fg ‖ε_c − ε_u‖ / mean_i ‖ε_c − ε_u‖ for each non-empty token region i, painted
    on its region, clamped to [rate_min, rate_max] and to cap / w, then smoothed. (B, 1, H, W) float32.
    """
    size = uncond.shape[-2:]
    masks = F.interpolate(segmentation.token_masks.float(), size=size, mode="nearest")
    fore = F.interpolate(segmentation.foreground.float(), size=size, mode="nearest")
    norm = (cond.float() - uncond.float()).norm(dim=1, keepdim=True)  # (B, 1, H, W)
    region_norm = (norm * masks).sum(dim=(2, 3)) / (masks.sum(dim=(2, 3)) + 1e-8)  # (B, T)
    fore_norm = (norm * fore).sum(dim=(2, 3)) / (fore.sum(dim=(2, 3)) + 1e-8)  # (B, 1)
    nonempty = (masks.sum(dim=(2, 3)) > 0).float()
    rate_per_token = fore_norm * nonempty / (region_norm + 1e-8)
    rate = (rate_per_token[..., None, None] * masks).sum(dim=1, keepdim=True)
    rate = rate.clamp(min=rate_min, max=rate_max)
    if guidance_scale > 0:
        rate = rate.clamp(max=cap / guidance_scale)
    return smooth(rate) if smoothing else rate


@dataclass
class MaskSet:
    """Segmentation masks of a sampling run, for looking at and for evaluation.

    tokens[i]: the token strings of image i's prompt (index = token position).
    steps: step index -> (labels (B, h, w) int token index, foreground (B, h, w) bool), on CPU.
    """

    tokens: list[list[str]]
    steps: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def labels(self, image: int, step: int | None = None) -> np.ndarray:
        """(h, w) token index per pixel of one image at one step (default: the last recorded)."""
        step = max(self.steps) if step is None else step
        if step not in self.steps:
            raise KeyError(f"step {step} has no masks; recorded steps: {sorted(self.steps)}")
        return self.steps[step][0][image].numpy()

    def foreground(self, image: int, step: int | None = None) -> np.ndarray:
        step = max(self.steps) if step is None else step
        return self.steps[step][1][image].numpy()

    def render(self, image: int, picture=None, step: int | None = None, size: int = 256):
        """A coloured overlay of the token regions with a legend (PIL image); see ``render_overlay``."""
        return render_overlay(self.labels(image, step), self.tokens[image], picture, size=size)


_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
     [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0], [255, 215, 180],
     [0, 0, 128], [128, 128, 128]], dtype=np.uint8)


def render_overlay(labels: np.ndarray, tokens: list[str], picture=None, size: int = 256, alpha: float = 0.55):
    """Colour every pixel by its token, blended over ``picture`` (PIL image, optional), with a
    legend naming the tokens that own at least one pixel. Returns a PIL image."""
    from PIL import Image, ImageDraw

    present = [int(t) for t in np.unique(labels)]
    colours = {t: _PALETTE[i % len(_PALETTE)] for i, t in enumerate(present)}
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    for t, c in colours.items():
        rgb[labels == t] = c
    overlay = Image.fromarray(rgb).resize((size, size * labels.shape[0] // labels.shape[1]), Image.NEAREST)
    if picture is not None:
        base = picture.convert("RGB").resize(overlay.size, Image.BILINEAR)
        overlay = Image.blend(base, overlay, alpha)
    row_h = 14
    legend = Image.new("RGB", (overlay.width, row_h * len(present) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for i, t in enumerate(present):
        y = 2 + i * row_h
        draw.rectangle([4, y, 14, y + 10], fill=tuple(int(v) for v in colours[t]))
        name = tokens[t] if t < len(tokens) else f"#{t}"
        share = float((labels == t).mean())
        draw.text((20, y - 1), f"{t}: {name}  ({share:.0%})", fill=(0, 0, 0))
    out = Image.new("RGB", (overlay.width, overlay.height + legend.height), (255, 255, 255))
    out.paste(overlay, (0, 0))
    out.paste(legend, (0, overlay.height))
    return out
