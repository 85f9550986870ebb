"""Paired comparison of two evaluation folders: the same prompts and seeds rendered by two models,
checkpoints or settings, compared image by image.

Near a rate of 30%, two independent rates of 200 prompts each are two standard errors apart only
when they differ by ~9 points; paired on the same prompts and seeds, the prompts' own difficulty
cancels and smaller differences separate (``metrics.paired_difference``). Nothing is written into
either folder.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import BadInput, EvalFolderError
from .summary import difference_cells, load_job_records, paired_checks, require_eval_folder

# Record fields that must agree between two images for them to be a pair.
SAME_INPUT_FIELDS = ("prompt", "seed", "steps")


def _run_records(folder: Path, name: str) -> list[dict[str, Any]]:
    require_eval_folder(folder, name)
    records = [r for r in load_job_records(folder) if "scores" in r]
    if not records:
        raise EvalFolderError(f"{name}: {str(folder)!r} has no scored images (only built-in prompts are scored)")
    return records


def parse_pairs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``LABEL`` (the same config in both runs) or ``LABEL_A=LABEL_B`` per spec."""
    pairs = []
    for spec in specs:
        a, sep, b = spec.partition("=")
        if not a or (sep and not b):
            raise BadInput(f"--pair: expected LABEL or LABEL_A=LABEL_B (e.g. cfg@5 or cfg@5=cfg@7.5), got {spec!r}")
        pairs.append((a, b or a))
    return pairs


def _by_config(records: list[dict[str, Any]]) -> dict[str, dict[tuple[int, int], dict[str, Any]]]:
    grouped: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for r in records:
        grouped.setdefault(r["config"], {})[(r["prompt_index"], r["sample_index"])] = r
    return grouped


def _check_same_inputs(a: dict[tuple[int, int], dict[str, Any]], b: dict[tuple[int, int], dict[str, Any]],
                       label_a: str, label_b: str) -> None:
    """Refuse pairs whose images were not made from the same prompt, seed and step count."""
    for key in sorted(set(a) & set(b)):
        for field in SAME_INPUT_FIELDS:
            if a[key].get(field) != b[key].get(field):
                raise BadInput(
                    f"DIR_A {label_a} and DIR_B {label_b}: image p{key[0]:05d}_k{key[1]:03d} was made with {field} "
                    f"{a[key].get(field)!r} in one run and {b[key].get(field)!r} in the other; pairs need the same "
                    "--prompts, --prompt-seed, --seed and --steps in both runs"
                )


def compare_runs(dir_a: str | Path, dir_b: str | Path, pairs: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """Paired differences (run A − run B) of each ``PAIRED_CHECKS`` check, for each (config of A,
    config of B) pair [default: every config both runs have], on the images both runs made from
    the same prompt index, sample index, prompt, seed and step count. Each row holds config_a,
    config_b, check, rate_a, rate_b, diff, diff_se, z and n_pairs."""
    by_a, by_b = _by_config(_run_records(Path(dir_a), "DIR_A")), _by_config(_run_records(Path(dir_b), "DIR_B"))
    if not pairs:
        pairs = [(label, label) for label in by_a if label in by_b]
        if not pairs:
            raise BadInput(f"the runs have no config in common (DIR_A: {', '.join(by_a)}; DIR_B: {', '.join(by_b)}); "
                           "name the configs to compare with --pair LABEL_A=LABEL_B")
    for label_a, label_b in pairs:
        for label, grouped, name in ((label_a, by_a, "DIR_A"), (label_b, by_b, "DIR_B")):
            if label not in grouped:
                raise BadInput(f"--pair: {name} has no scored config {label!r}; it has {', '.join(grouped)}")
    rows = []
    for label_a, label_b in pairs:
        _check_same_inputs(by_a[label_a], by_b[label_b], label_a, label_b)
        scores_a = {k: r["scores"] for k, r in by_a[label_a].items()}
        scores_b = {k: r["scores"] for k, r in by_b[label_b].items()}
        for row in paired_checks(scores_a, scores_b):
            rows.append({"config_a": label_a, "config_b": label_b, **row})
    if not rows:
        raise BadInput("the runs share no image (prompt index and sample index) for the compared configs")
    return rows


def compare_markdown(rows: Sequence[dict[str, Any]], dir_a: str | Path, dir_b: str | Path) -> str:
    """The rows of ``compare_runs`` as a Markdown table headed by the two folders."""
    lines = [f"A: {dir_a}", f"B: {dir_b}", "",
             "| A config | B config | check | A rate | B rate | A − B ± se | z | pairs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config_a']} | {r['config_b']} | {r['check']} | {r['rate_a']:.3f} | {r['rate_b']:.3f} | "
                     f"{difference_cells(r)} |")
    return "\n".join(lines) + "\n"
