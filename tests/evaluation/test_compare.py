"""``attnguide eval compare``: two runs paired image by image on the same prompts and seeds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from attnguide.cli import main as cli_main
from attnguide.evaluation import storage
from attnguide.evaluation.compare import compare_runs, parse_pairs
from attnguide.evaluation.errors import BadInput, EvalFolderError


def _write_run(folder: Path, config: str, fully: list[bool], *, seed: int = 0, prompt: str = "a red circle") -> Path:
    """A minimal evaluation folder: run.json and one scored job record per prompt of ``config``."""
    (folder / storage.JOBS_DIR / "slug").mkdir(parents=True)
    storage.atomic_write_text(folder / storage.RUN_FILE, json.dumps({"configs": [config]}))
    for p, ok in enumerate(fully):
        record = {"config": config, "prompt_index": p, "sample_index": 0, "prompt": f"{prompt} {p}", "seed": seed + 1000 * p,
                  "steps": 30, "scores": {"fully_correct": ok, "present": True}}
        storage.atomic_write_text(folder / storage.JOBS_DIR / "slug" / f"p{p:05d}_k000.json", json.dumps(record))
    return folder


def test_compare_pairs_images_by_prompt_and_seed(tmp_path):
    a = _write_run(tmp_path / "a", "cfg@5", [True, True, False, True])
    b = _write_run(tmp_path / "b", "cfg@5", [False, True, False])  # prompt 3 missing in B: 3 pairs
    rows = {r["check"]: r for r in compare_runs(a, b)}
    assert rows["fully_correct"]["n_pairs"] == 3
    assert rows["fully_correct"]["diff"] == pytest.approx(1 / 3)  # differences 1, 0, 0
    assert (rows["fully_correct"]["rate_a"], rows["fully_correct"]["rate_b"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert rows["present"]["diff"] == 0.0 and rows["present"]["z"] is None
    assert sorted(p.name for p in a.iterdir()) == ["jobs", "run.json"]  # nothing written


def test_compare_cli_names_configs_across_runs(tmp_path):
    a = _write_run(tmp_path / "a", "cfg@5", [True, True])
    b = _write_run(tmp_path / "b", "cfg@7.5", [False, True])
    result = CliRunner().invoke(cli_main, ["eval", "compare", str(a), str(b), "--pair", "cfg@5=cfg@7.5"])
    assert result.exit_code == 0, result.output
    assert "| cfg@5 | cfg@7.5 | fully_correct | 1.000 | 0.500 | +0.500 ± 0.500 | +1.0 | 2 |" in result.output
    result = CliRunner().invoke(cli_main, ["eval", "compare", str(a), str(b)])
    assert result.exit_code == 2 and "no config in common" in result.output


def test_compare_refuses_runs_made_from_other_prompts_or_seeds(tmp_path):
    a = _write_run(tmp_path / "a", "cfg@5", [True, False])
    with pytest.raises(BadInput, match="p00000_k000 was made with seed 0 in one run and 1 in the other"):
        compare_runs(a, _write_run(tmp_path / "b", "cfg@5", [True, False], seed=1))
    with pytest.raises(BadInput, match="prompt"):
        compare_runs(a, _write_run(tmp_path / "c", "cfg@5", [True, False], prompt="a blue square"))
    with pytest.raises(BadInput, match=r"--pair: DIR_B has no scored config 'pag@2'; it has cfg@5"):
        compare_runs(a, a, [("cfg@5", "pag@2")])
    with pytest.raises(EvalFolderError, match="DIR_B.*not an evaluation folder"):
        compare_runs(a, tmp_path)
    with pytest.raises(BadInput, match="--pair: expected LABEL or LABEL_A=LABEL_B"):
        parse_pairs(["cfg@5="])
