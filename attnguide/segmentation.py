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
GRID_OPERATOR_BUDGET = 16 * 2**20  # bytes up to which resampling runs as one (positions x positions) matrix


def gaussian_kernel_1d(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """One axis of the reference's smoothing kernel, exp(−((x−μ)/(2σ))²) normalised to sum 1
    (float64). The 2-D kernel is its outer product: it is separable."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-((x / (2 * sigma)) ** 2))
    return k / k.sum()


@functools.lru_cache(maxsize=64)
def _axis_operator(size: int, target: int, smoothing: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(target, size) matrix of one axis of ``resample``: linear resampling with
    align_corners=False, then the 3-tap Gaussian with reflect padding (replicate for one pixel)."""
    impulses = torch.eye(size, dtype=torch.float64).view(size, 1, size)
    if target != size:
        impulses = F.interpolate(impulses, size=target, mode="linear", align_corners=False)
    if smoothing:
        padded = F.pad(impulses, (1, 1), mode="reflect" if target > 1 else "replicate")
        impulses = F.conv1d(padded, gaussian_kernel_1d().view(1, 1, 3))
    return impulses.view(size, target).T.contiguous().to(device=device, dtype=dtype)


def resample(maps: torch.Tensor, size: tuple[int, int], smoothing: bool) -> torch.Tensor:
    """Bilinear resampling of (..., h, w) maps to ``size`` (as ``F.interpolate`` with
    align_corners=False), then, if ``smoothing``, the reference's 3x3 Gaussian with reflect padding.

    Both act on each axis on their own, so the whole is two small matrix products, M_h · X · M_wᵀ,
    instead of an interpolation, a padding and a one-channel convolution per call."""
    h, w = maps.shape[-2:]
    if (h, w) == tuple(size) and not smoothing:
        return maps
    rows = _axis_operator(h, size[0], smoothing, maps.device, maps.dtype)
    cols = _axis_operator(w, size[1], smoothing, maps.device, maps.dtype)
    return torch.matmul(torch.matmul(rows, maps), cols.T)


@functools.lru_cache(maxsize=32)
def _grid_operator(hw: tuple[int, int], target: tuple[int, int], smoothing: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """``resample`` as one (th·tw, h·w) matrix acting on row-major flattened maps (the Kronecker
    product of the two axis operators), or ``None`` when it would exceed ``GRID_OPERATOR_BUDGET``."""
    if target[0] * target[1] * hw[0] * hw[1] * 4 > GRID_OPERATOR_BUDGET:
        return None
    rows = _axis_operator(hw[0], target[0], smoothing, torch.device("cpu"), torch.float64)
    cols = _axis_operator(hw[1], target[1], smoothing, torch.device("cpu"), torch.float64)
    return torch.kron(rows, cols).to(device=device, dtype=dtype)


def _resample_positions(maps: torch.Tensor, hw: tuple[int, int], target: tuple[int, int], smoothing: bool) -> torch.Tensor:
    """``resample`` for maps laid out as (B, positions, tokens), the layout attention produces.
    Small grids take one batched product with the cached grid operator (no transposed copies);
    large ones go through the separable form."""
    if tuple(hw) == tuple(target) and not smoothing:
        return maps
    operator = _grid_operator(tuple(hw), tuple(target), smoothing, maps.device, maps.dtype)
    if operator is not None:
        return torch.bmm(operator.expand(maps.shape[0], -1, -1), maps)
    grids = maps.transpose(1, 2).reshape(maps.shape[0], maps.shape[2], *hw)
    return resample(grids, target, smoothing).flatten(2).transpose(1, 2)


def smooth(maps: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian smoothing of (..., h, w) maps with reflect padding."""
    return resample(maps, maps.shape[-2:], smoothing=True)


def _probabilities(record: SelfRecord, queries: slice, heads: slice) -> torch.Tensor:
    """Softmax attention probabilities of some heads and query rows: (rows, heads, n_q, N)."""
    q = record.query[:, heads, queries]
    logits = torch.matmul(q, record.key[:, heads].transpose(-1, -2))
    if record.linear:  # Sana's linear attention (q, k already through relu), as SanaLinearAttnProcessor2_0
        return logits.div_(logits.sum(dim=-1, keepdim=True).add_(1e-15))
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
    paper: (S̄ + S̄² + … + S̄^R)·C / R — the paper's completion (mean of the first R powers).
    S-CFG step 2 (Shen et al. 2024, methods.md).
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


def _layer_groups(records: dict[str, object], pairs: list[tuple[str, str, int]]) -> list[list[tuple[str, str, int]]]:
    """Pairs that can be processed as one batch: same grid, heads, scale and token count, in chunks
    whose stacked S̄ fits ``SELF_MAP_BUDGET`` (one batched pass per chunk instead of one per layer
    keeps the number of small tensor ops, which dominates at low resolution, constant)."""
    by_shape: dict[tuple, list[tuple[str, str, int]]] = {}
    for pair in pairs:
        self_name, cross_name, factor = pair
        record = records[self_name]
        key = (factor, tuple(record.query.shape), record.scale, tuple(records[cross_name].shape))
        by_shape.setdefault(key, []).append(pair)
    groups = []
    for (_, (rows, _, n, _), _, _), members in by_shape.items():
        per_chunk = max(1, SELF_MAP_BUDGET // (rows * n * n * 4))
        groups.extend(members[i : i + per_chunk] for i in range(0, len(members), per_chunk))
    return groups


def _stacked(records: dict[str, object], group: list[tuple[str, str, int]]) -> tuple[torch.Tensor, SelfRecord]:
    """Cross maps and self-attention q/k of a group's layers stacked along the batch dimension."""
    selfs = [records[s] for s, _, _ in group]
    crosses = [records[c] for _, c, _ in group]
    if len(group) == 1:
        return crosses[0], selfs[0]
    record = SelfRecord(torch.cat([r.query for r in selfs]), torch.cat([r.key for r in selfs]), selfs[0].scale,
                        selfs[0].linear)
    return torch.cat(crosses), record


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
    Every layer's maps are completed, resized to the finest grid, smoothed and renormalised on
    their own, then averaged over layers; layers of equal shape go through this as one batch.
    """
    finest = min(f for _, _, f in pairs)
    target = grid_shape(-(-latent_hw[0] // finest) * -(-latent_hw[1] // finest), latent_hw, finest)
    resized = []
    for group in _layer_groups(records, pairs):
        cross, record = _stacked(records, group)
        completed = complete(cross, record, mode, power)  # step 2: C <- S̄·C, (layers * rows, N, T)
        hw = grid_shape(completed.shape[1], latent_hw, group[0][2])
        maps = _resample_positions(completed, hw, target, smoothing)  # step 3: finest grid, 3x3 Gaussian
        resized.append(maps.reshape(len(group), -1, *maps.shape[1:]))
    maps = torch.cat(resized) if len(resized) > 1 else resized[0]  # (layers, rows, positions, T)
    # Step 4: spatial renormalisation per layer (every token gets a chance to win pixels), then the
    # equal-weight mean over layers. Step 5: hard argmax over all token positions; foreground where
    # the other tokens' summed map beats the start token's.
    tokens = maps[:, token_rows]
    token_scores = (tokens / (tokens.mean(dim=2, keepdim=True) + 1e-8)).mean(dim=0)
    fg = maps[:, foreground_rows]
    fore = torch.stack([fg[..., 0], fg[..., 1:].sum(dim=-1)], dim=-1)
    tiny = torch.finfo(fore.dtype).tiny  # softmax maps are positive; only guards exact zeros
    fore_scores = (fore / fore.mean(dim=2, keepdim=True).clamp_min(tiny)).mean(dim=0)
    token_masks = token_scores == token_scores.max(dim=-1, keepdim=True).values
    foreground = ~(fore_scores == fore_scores.max(dim=-1, keepdim=True).values)[..., :1]

    def as_grid(x: torch.Tensor) -> torch.Tensor:  # (B, positions, C) -> (B, C, h, w)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *target)

    token_masks, foreground, token_scores = as_grid(token_masks), as_grid(foreground), as_grid(token_scores)
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
    # Channel L2 norm; square-sum-sqrt is ~7x faster than .norm() on these small maps on CPU.
    norm = (cond.float() - uncond.float()).square().sum(dim=1, keepdim=True).sqrt_()  # (B, 1, H, W)
    area = masks.sum(dim=(2, 3))  # (B, T)
    region_norm = (norm * masks).sum(dim=(2, 3)) / (area + 1e-8)
    fore_norm = (norm * fore).sum(dim=(2, 3)) / (fore.sum(dim=(2, 3)) + 1e-8)  # (B, 1)
    nonempty = (area > 0).float()
    rate_per_token = fore_norm * nonempty / (region_norm + 1e-8)  # step 6: rate_i = mean_f(n) / mean_i(n)
    rate = (rate_per_token[..., None, None] * masks).sum(dim=1, keepdim=True)
    rate = rate.clamp(min=rate_min, max=rate_max)
    if guidance_scale > 0:
        rate = rate.clamp(max=cap / guidance_scale)
    return smooth(rate) if smoothing else rate


def mask_sources(plan, config, want_masks: bool) -> tuple[str, ...]:
    """Branches whose attention the segmentation reads this step (none if nothing needs masks)."""
    if not (plan.scfg or want_masks):
        return ()
    if config.scfg.mode == "reference" and "uncond" in plan.branches:
        return ("uncond", "cond")  # tokens from the conditional half, foreground from the unconditional
    return ("cond",)


def segment_records(taps, sources, pairs, latent_hw, opts) -> Segmentation:
    """Segment from the taps' records; rows are ordered as ``sources`` (uncond before cond)."""
    first = next(iter(taps.records.values()))
    rows = first.query.shape[0] if isinstance(first, SelfRecord) else first.shape[0]
    chunk = rows // len(sources)
    start = sources.index("cond") * chunk
    cond = slice(start, start + chunk)
    fore = slice(0, chunk) if "uncond" in sources else cond
    return segment(
        taps.records, pairs, tuple(latent_hw), opts.mode, opts.power, opts.smoothing, token_rows=cond, foreground_rows=fore
    )


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
