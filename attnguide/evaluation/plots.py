"""Plots of an evaluation folder (matplotlib, Agg backend, PNG), from summary rows and records.

- ``quality_alignment.png``: Fréchet distance (y, lower is better) against fully-correct rate
  (x, higher is better), one line per method across its scales, points labelled by scale.
- ``metrics_vs_scale.png``: every available metric against the swept scale (w; s for pag), one
  line per method; ``none`` (no scale) is a dashed horizontal reference line.
- ``grid.png``: sample grid, configs x first prompts (sample 0, one seed each), with a row of
  S-CFG mask overlays under every scfg config that has them.
"""
from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .storage import PLOTS_DIR, atomic_write_bytes  # noqa: E402

METRICS: tuple[tuple[str, str], ...] = (
    ("fully_correct", "fully-correct rate ↑"),
    ("fd", "Fréchet distance ↓"),
    ("diversity", "diversity (mean pairwise L2) ↑"),
    ("clip_score", "CLIP score ↑"),
    ("seconds_per_image", "seconds per image"),
    ("unet_evals_per_image", "U-Net evaluations per image"),
)


def _by_method(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row)
    for method_rows in groups.values():
        method_rows.sort(key=lambda r: (r["scale"] is None, r["scale"] or 0.0, r["s"] or 0.0))
    return groups


def _scale_label(row: dict[str, Any]) -> str:
    parts = [f"{name}={row[key]:g}" for name, key in (("w", "w"), ("s", "s")) if row.get(key) is not None]
    return ",".join(parts) or row["method"]


def _save(fig, path: Path) -> Path:
    """Save ``fig`` as PNG at ``path`` (written atomically) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def quality_alignment(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """FD against fully-correct rate, a line per method; None when the rows lack these metrics."""
    usable = [r for r in rows if r.get("fully_correct") is not None and r.get("fd") is not None]
    if not usable:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for method, method_rows in _by_method(usable).items():
        xs = [r["fully_correct"] for r in method_rows]
        ys = [r["fd"] for r in method_rows]
        ax.plot(xs, ys, marker="o", label=method)
        for r, x, y in zip(method_rows, xs, ys):
            ax.annotate(_scale_label(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("fully-correct rate (alignment) →")
    ax.set_ylabel("Fréchet distance to real images (quality, lower is better)")
    ax.set_title("quality vs alignment across scales")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def metrics_vs_scale(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Every metric some row has against the swept scale, a line per method."""
    metrics = [(k, name) for k, name in METRICS if any(r.get(k) is not None for r in rows)]
    if not metrics:
        return None
    cols = min(3, len(metrics))
    nrows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    groups = _by_method(rows)
    for ax, (key, name) in zip(axes.flat, metrics):
        for i, (method, method_rows) in enumerate(groups.items()):
            colour = f"C{i}"
            scaled = [r for r in method_rows if r["scale"] is not None and r.get(key) is not None]
            if scaled:
                ax.plot([r["scale"] for r in scaled], [r[key] for r in scaled], marker="o", color=colour, label=method)
            for r in method_rows:
                if r["scale"] is None and r.get(key) is not None:
                    ax.axhline(r[key], color=colour, linestyle="--", linewidth=1, label=f"{method} (no scale)")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("scale (w; s for pag)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path)


def _grid_columns(records: Sequence[dict[str, Any]], max_columns: int) -> list[int]:
    with_masks = sorted({r["prompt_index"] for r in records if r.get("mask_overlay")})
    if with_masks:
        return with_masks[:max_columns]
    return sorted({r["prompt_index"] for r in records if r["sample_index"] == 0})[:max_columns]


def sample_grid(out: Path, rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]], path: Path,
                max_columns: int = 6) -> Path | None:
    """Configs x prompts (sample 0), S-CFG mask overlays in an extra row under scfg configs."""
    from PIL import Image

    columns = _grid_columns(records, max_columns)
    if not columns:
        return None
    cell = {(r["config"], r["prompt_index"]): r for r in records if r["sample_index"] == 0}
    grid_rows: list[tuple[str, str]] = []  # (config, "image" | "mask")
    for row in rows:
        grid_rows.append((row["config"], "image"))
        if any(cell.get((row["config"], p), {}).get("mask_overlay") for p in columns):
            grid_rows.append((row["config"], "mask"))
    fig, axes = plt.subplots(len(grid_rows), len(columns), figsize=(1.9 * len(columns), 2.0 * len(grid_rows)),
                             squeeze=False)
    for i, (config, kind) in enumerate(grid_rows):
        for j, p in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            record = cell.get((config, p))
            key = "image" if kind == "image" else "mask_overlay"
            if record and record.get(key):
                with Image.open(out / record[key]) as im:
                    ax.imshow(im.convert("RGB"), interpolation="nearest")
            if j == 0:
                ax.set_ylabel(config if kind == "image" else f"{config}\nmasks", fontsize=8)
            if i == 0 and record:
                ax.set_title("\n".join(textwrap.wrap(record["prompt"], 28)) + f"\nseed {record['seed']}", fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def make_plots(out: str | Path, rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]) -> list[Path]:
    """Write every plot the data allows into ``out/plots``; returns the paths written."""
    out = Path(out)
    folder = out / PLOTS_DIR
    made = [
        quality_alignment(rows, folder / "quality_alignment.png"),
        metrics_vs_scale(rows, folder / "metrics_vs_scale.png"),
        sample_grid(out, rows, records, folder / "grid.png"),
    ]
    return [p for p in made if p is not None]
