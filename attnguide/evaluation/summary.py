"""Summaries of an evaluation folder: per-job records merged into ``records.jsonl``, per-config
metrics (``summary.csv``/``.md``/``.json``) and plots, rebuilt from the saved records and images.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .errors import EvalFolderError
from .storage import JOBS_DIR, RECORDS_FILE, RUN_FILE, TIMING_FIELD, atomic_write_text, read_json
from .sweep import config_from_record

# Records -> summary


def load_job_records(out: Path) -> list[dict[str, Any]]:
    """Every finished job's record, sorted by config slug and job name."""
    folder = Path(out) / JOBS_DIR
    paths = sorted(folder.glob("*/*.json")) if folder.is_dir() else []
    return [read_json(p) for p in paths]


def merge_records(out: Path) -> list[dict[str, Any]]:
    """Merge the per-job files into ``records.jsonl`` (atomically) and return the records."""
    records = load_job_records(out)
    atomic_write_text(Path(out) / RECORDS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return records


def strip_timing(record: dict[str, Any]) -> dict[str, Any]:
    """A record without the fields that differ between otherwise identical runs."""
    return {k: v for k, v in record.items() if k != TIMING_FIELD}


def _order(records: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    labels = list(dict.fromkeys([*meta.get("configs", []), *(r["config"] for r in records)]))
    present = {r["config"] for r in records}
    return [label for label in labels if label in present]


def _image_features(out: Path, records: list[dict[str, Any]], evaluator, progress: bool) -> np.ndarray:
    from PIL import Image

    from ..builtin import data
    from .evaluator import to_eval_array

    arrays = []
    for r in tqdm(records, desc="features", disable=not progress, leave=False):
        with Image.open(out / r["image"]) as im:
            arrays.append(to_eval_array(im, data.RESOLUTION))
    return evaluator.features(np.stack(arrays)) if arrays else np.zeros((0, 1))


def data_resolution() -> int:
    """The evaluator's (and the built-in scenes') image resolution."""
    from ..builtin import data

    return data.RESOLUTION


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _real_features(meta: dict[str, Any], count: int, evaluator) -> np.ndarray:
    """Evaluator features of ``count`` rendered held-out scenes; the first ones are exactly the
    prompts' scenes (``data.scenes`` is a stream), the rest more of the same distribution."""
    from ..builtin import data

    scenes = data.scenes(meta["prompt_seed"], count, "heldout")
    return evaluator.features(data.render_batch(scenes))


def summarize(out: Path, records: list[dict[str, Any]], meta: dict[str, Any], *,
              evaluator_path: str | None = None, min_real: int | None = None,
              progress: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-config summary rows (see ``SUMMARY_FIELDS``) and notes, from records and images."""
    labels = _order(records, meta)
    by_config = {label: [r for r in records if r["config"] == label] for label in labels}
    if any("scores" in r for r in records):
        feats, real, notes = _feature_sets(out, records, by_config, meta, evaluator_path, min_real, progress)
    else:
        feats, real = None, None
        notes = ["Prompts without ground truth: only model-agnostic metrics (and CLIP score with --clip)."]
    rows = [_summary_row(label, rs, None if feats is None else feats[label], real) for label, rs in by_config.items()]
    return rows, notes


def _feature_sets(out: Path, records: list[dict[str, Any]], by_config: dict[str, list[dict[str, Any]]],
                  meta: dict[str, Any], evaluator_path: str | None, min_real: int | None,
                  progress: bool) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Evaluator features of each config's images and of the real (rendered) images, with notes."""
    from .evaluator import Evaluator

    evaluator = Evaluator.load(evaluator_path or meta.get("evaluator"))
    all_feats = _image_features(out, records, evaluator, progress)
    index = {id(r): i for i, r in enumerate(records)}
    feats = {label: all_feats[[index[id(r)] for r in rs]] for label, rs in by_config.items()}
    n_real = max([min_real or meta.get("min_real", 500), *(len(rs) for rs in by_config.values())])
    real = _real_features(meta, n_real, evaluator)
    notes = []
    size = _image_size(out / records[0]["image"])
    if size != (data_resolution(), data_resolution()):
        notes.append(f"Images are {size[0]}x{size[1]}; they were resized (bilinear) to the evaluator's "
                     f"{data_resolution()}x{data_resolution()} for detection and features.")
    notes.append(f"Fréchet distance: evaluator features of each config's images vs {n_real} rendered held-out "
                 f"scenes (the prompts' own scenes first); it is biased upwards for small image counts, "
                 "so compare configs only at equal n.")
    return feats, real, notes


def _summary_row(label: str, rs: list[dict[str, Any]], feats: np.ndarray | None,
                 real: np.ndarray | None) -> dict[str, Any]:
    """The summary row of one config; ``feats`` None when the images have no ground truth."""
    from . import metrics

    config = config_from_record(rs[0])
    row: dict[str, Any] = {
        "config": label, "method": config.method, "w": config.guidance_scale, "s": config.pag_scale,
        "scale": config.scale, "n_images": len(rs), "n_prompts": len({r["prompt_index"] for r in rs}),
        "unet_evals_per_image": float(np.mean([r["unet_evaluations"] for r in rs])),
        "seconds_per_image": float(np.mean([r[TIMING_FIELD]["seconds_per_image"] for r in rs])),
    }
    if feats is not None:
        row.update(metrics.geneval_summary([r["scores"] for r in rs]))
        row["fd"] = metrics.frechet(feats, real)
        row["diversity"], row["n_diversity_prompts"] = metrics.diversity(feats, [r["prompt_index"] for r in rs])
    if any("clip_score" in r for r in rs):
        row["clip_score"] = float(np.mean([r["clip_score"] for r in rs if "clip_score" in r]))
    return row


# Per-image checks the paired comparisons are made on (each 0/1 per image).
PAIRED_CHECKS = ("fully_correct", "present")
PAIRED_FIELDS = ("config", "reference", "check", "diff", "diff_se", "z", "n_pairs", "rate", "reference_rate")


def paired_rows(records: list[dict[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """Each config against the configs one component away from it (``Config.ablations``) that the
    run also has, on the images both made from the same prompt and seed: the mean difference of
    each check of ``PAIRED_CHECKS`` with its standard error and z."""
    by_config: dict[str, dict[tuple[int, int], dict[str, Any]]] = {label: {} for label in labels}
    for r in records:
        if "scores" in r:
            by_config[r["config"]][(r["prompt_index"], r["sample_index"])] = r["scores"]
    rows = []
    for label in labels:
        scores = by_config[label]
        if not scores:
            continue
        config = config_from_record(next(r for r in records if r["config"] == label))
        for reference in (c.label for c in config.ablations()):
            for row in paired_checks(scores, by_config.get(reference) or {}):
                rate, reference_rate = row.pop("rate_a"), row.pop("rate_b")
                rows.append({"config": label, "reference": reference, **row, "rate": rate, "reference_rate": reference_rate})
    return rows


def paired_checks(scores_a: dict[Any, dict[str, Any]], scores_b: dict[Any, dict[str, Any]]) -> list[dict[str, Any]]:
    """For each check of ``PAIRED_CHECKS``: ``metrics.paired_difference`` of a − b over the keys
    (image identities) both score maps have with that check scored, plus both rates on those
    pairs. Checks with no such pair are left out."""
    from . import metrics

    rows = []
    for check in PAIRED_CHECKS:
        keys = [k for k in sorted(set(scores_a) & set(scores_b))
                if scores_a[k].get(check) is not None and scores_b[k].get(check) is not None]
        if keys:
            a = [float(scores_a[k][check]) for k in keys]
            b = [float(scores_b[k][check]) for k in keys]
            rows.append({"check": check, "rate_a": sum(a) / len(a), "rate_b": sum(b) / len(b), **metrics.paired_difference(a, b)})
    return rows


def paired_markdown(rows: list[dict[str, Any]]) -> str:
    """The paired comparisons as a Markdown table (empty when there are none)."""
    if not rows:
        return ""
    lines = ["| config − reference | check | difference ± se | z | pairs |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} − {r['reference']} | {r['check']} | {difference_cells(r)} |")
    return "\n".join(lines) + "\n"


def difference_cells(row: dict[str, Any]) -> str:
    """The Markdown cells 'difference ± se | z | pairs' of one paired comparison."""
    se = "–" if row["diff_se"] is None else f"{row['diff_se']:.3f}"
    z = "–" if row["z"] is None else f"{row['z']:+.1f}"
    return f"{row['diff']:+.3f} ± {se} | {z} | {row['n_pairs']}"


def require_eval_folder(folder: Path, name: str) -> None:
    """Raise ``EvalFolderError`` naming the argument ``name`` unless ``folder`` holds a run."""
    if not (Path(folder) / RUN_FILE).is_file():
        raise EvalFolderError(f"{name}: {str(folder)!r} is not an evaluation folder (it has no {RUN_FILE})")


SUMMARY_FIELDS = (
    "config", "method", "w", "s", "scale", "n_images", "n_prompts", "fully_correct", "fully_correct_se",
    "fully_correct_1obj", "fully_correct_2obj", "fully_correct_3obj", "present", "colour_bound", "size_correct", "count_correct", "relation_correct", "fd", "diversity",
    "n_diversity_prompts", "clip_score", "unet_evals_per_image", "seconds_per_image",
)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_markdown(rows: list[dict[str, Any]], notes: Sequence[str] = (), paired: Sequence[dict[str, Any]] = ()) -> str:
    """The summary as a Markdown table (only columns some row has), the paired comparisons
    (``paired_rows``) when there are any, and the notes."""
    names = {
        "config": "config", "n_images": "images", "fully_correct": "fully correct",
        "fully_correct_1obj": "1 obj", "fully_correct_2obj": "2 obj", "fully_correct_3obj": "3 obj", "present": "present",
        "colour_bound": "colour", "size_correct": "size", "count_correct": "count", "relation_correct": "relation",
        "fd": "FD ↓", "diversity": "diversity", "clip_score": "CLIP score", "unet_evals_per_image": "U-Net evals/img",
        "seconds_per_image": "s/img",
    }
    columns = [c for c in names if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(names[c] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            if c == "fully_correct" and r.get(c) is not None:
                cells.append(f"{r[c]:.3f} ± {r['fully_correct_se']:.3f}")
            elif c == "unet_evals_per_image":
                cells.append(f"{r[c]:g}")
            elif c in ("fd", "diversity", "clip_score", "seconds_per_image"):
                cells.append(_fmt(r.get(c), 2 if c != "seconds_per_image" else 3))
            else:
                cells.append(_fmt(r.get(c)))
        lines.append("| " + " | ".join(cells) + " |")
    if paired:
        lines += ["", "Paired differences (same prompts and seeds; |z| ≥ 2 is significant at about 5%):", "",
                  paired_markdown(list(paired)).rstrip("\n")]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buffer.getvalue()


def write_summary(out: Path, rows: list[dict[str, Any]], notes: Sequence[str], paired: Sequence[dict[str, Any]] = ()) -> None:
    """summary.csv, summary.md, summary.json and paired.csv in ``out`` (each written atomically)."""
    atomic_write_text(out / "summary.csv", _csv(rows, SUMMARY_FIELDS))
    atomic_write_text(out / "paired.csv", _csv(paired, PAIRED_FIELDS))
    atomic_write_text(out / "summary.md", summary_markdown(rows, notes, paired))
    atomic_write_text(out / "summary.json", json.dumps({"rows": rows, "paired": list(paired), "notes": list(notes)}, indent=1) + "\n")


def report(out: str | Path, *, evaluator_path: str | None = None, min_real: int | None = None,
           plots: bool = True, progress: bool = False) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """Rebuild ``records.jsonl``, the summary files and the plots of an output folder from its
    saved per-job records and images alone. Returns (summary rows, notes, paired comparisons)."""
    out = Path(out)
    require_eval_folder(out, "DIR")
    meta = read_json(out / RUN_FILE)
    records = merge_records(out)
    if not records:
        raise EvalFolderError(f"DIR: {str(out)!r} has no finished jobs yet")
    fingerprints = {r["model_fingerprint"] for r in records}
    if len(fingerprints) > 1:
        raise EvalFolderError(f"DIR: records of {str(out)!r} come from {len(fingerprints)} different models {sorted(fingerprints)}")
    rows, notes = summarize(out, records, meta, evaluator_path=evaluator_path, min_real=min_real, progress=progress)
    paired = paired_rows(records, [r["config"] for r in rows])
    write_summary(out, rows, notes, paired)
    if plots:
        from . import plots as plotting

        plotting.make_plots(out, rows, records)
    return rows, notes, paired
