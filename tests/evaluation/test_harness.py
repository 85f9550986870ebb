"""Tests for the evaluation harness: configs and seeds, resume after a kill, sharding equivalence
(2 processes under accelerate launch), metrics on known inputs, summary/report, CLI errors.

All generation uses a tiny random pipeline saved to a temporary folder (seconds on a CPU)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from attnguide import sampling
from attnguide.cli import main as cli_main
from attnguide.evaluation import errors, metrics, storage, summary, sweep
from attnguide.evaluation.runner import run_eval
from attnguide.evaluation.settings import EvalSettings
from attnguide.evaluation.sweep import Config, parse_configs

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
CONFIGS = [Config("cfg", 3.0), Config("scfg+pag", 3.0, 1.5)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from conftest import sd_components
    from diffusers import StableDiffusionPipeline

    path = tmp_path_factory.mktemp("tiny") / "model"
    StableDiffusionPipeline(**sd_components()).save_pretrained(path, safe_serialization=True)
    return path


def _settings(out: Path, model: Path, **kw) -> EvalSettings:
    base = dict(out=out, configs=CONFIGS, model=str(model), num_prompts=3, n=2, steps=2, batch=2, min_real=16,
                grid_prompts=1, progress=False, device="cpu")
    base.update(kw)
    return EvalSettings(**base)


class CountingGenerate:
    """``sampling.generate`` that counts images and raises after ``fail_after`` calls (a kill)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls, self.images, self.fail_after = 0, 0, fail_after

    def __call__(self, pipe, prompt, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.images += len(prompt)
        return sampling.generate(pipe, prompt, **kwargs)


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k != "seconds_per_image"} for r in rows]


def _records(out: Path) -> dict[str, dict]:
    return {r["job"]: summary.strip_timing(r) for r in (json.loads(line) for line in (out / "records.jsonl").open())}


# ---------------------------------------------------------------------------------------------
# Configs, seeds, units


def test_parse_configs_sweeps_and_explicit_scales():
    got = parse_configs(["none,cfg,pag", "cfg+pag", "scfg+pag@4/2", "cfg@5"], [3.0, 5.0], pag_scale=1.5)
    assert [c.label for c in got] == ["none", "cfg@3", "cfg@5", "pag@3", "pag@5", "cfg+pag@3/1.5", "cfg+pag@5/1.5",
                                      "scfg+pag@4/2"]  # cfg@5 given twice: kept once
    defaults = parse_configs(["cfg,pag,cfg+pag@5"], None, pag_scale=1.5, guidance_scale=5.0)
    assert [c.label for c in defaults] == ["cfg@5", "pag@1.5", "cfg+pag@5/1.5"]
    # Without scales: the built-in model's recommendation (its attnguide.json), for every entry point alike.
    from attnguide.pipelines import recommended_settings
    rec = recommended_settings(None)
    w, s = rec["guidance_scale"], rec["pag_scale"]
    assert [c.label for c in parse_configs(["cfg,pag,cfg+pag"])] == [f"cfg@{w:g}", f"pag@{s:g}", f"cfg+pag@{w:g}/{s:g}"]
    assert Config("cfg+pag", 5.0, 1.5).slug == "cfg-pag_w5_s1.5"
    assert Config("pag", None, 2.0).scale == 2.0 and Config("none").scale is None


@pytest.mark.parametrize("item, match", [
    ("cfgg", "unknown method"), ("none@3", "none takes no scale"), ("pag@2/1", "pag takes one scale"),
    ("cfg@x", "not a number"), ("cfg+pag@1/2/3", "w or w/s"), ("cfg@-1", ">= 0"),
])
def test_parse_configs_rejects_bad_items_naming_the_option(item, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_configs([item])
    assert "--methods" in str(info.value)


def test_seeds_depend_only_on_prompt_and_sample():
    jobs = sweep.build_jobs(CONFIGS, ["a", "b"], 3, seed=7)
    by_config = {c: [(j.prompt_index, j.sample_index, j.seed) for j in jobs if j.config == c] for c in CONFIGS}
    assert by_config[CONFIGS[0]] == by_config[CONFIGS[1]]
    assert len({j.seed for j in jobs}) == 6 and sweep.job_seed(7, 1, 2) == 1009


def test_work_units_are_per_config_and_shards_partition_them():
    jobs = sweep.build_jobs(CONFIGS, ["a", "b", "c"], 1, seed=0)
    units = sweep.work_units(jobs, 2)
    assert [len(u) for u in units] == [2, 1, 2, 1]
    assert all(len({j.config for j in u}) == 1 for u in units)
    shards = [sweep.shard(units, r, 3) for r in range(3)]
    assert sorted(j.key for s in shards for u in s for j in u) == sorted(j.key for j in jobs)


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_after_kill_matches_uninterrupted_run_and_recomputes_nothing(tiny_model, tmp_path):
    full = CountingGenerate()
    reference = run_eval(_settings(tmp_path / "full", tiny_model), generate_fn=full)
    assert reference.computed == full.images == 12

    killed = CountingGenerate(fail_after=3)  # 6 units of 2 images; dies while starting the 4th
    with pytest.raises(KeyboardInterrupt):
        run_eval(_settings(tmp_path / "resumed", tiny_model), generate_fn=killed)
    job_files = sorted((tmp_path / "resumed" / "jobs").glob("*/*.json"))
    assert len(job_files) == 6 and not list((tmp_path / "resumed").rglob("*.tmp"))
    stamps = {p: p.stat().st_mtime_ns for p in job_files}

    resumed = CountingGenerate()
    outcome = run_eval(_settings(tmp_path / "resumed", tiny_model), generate_fn=resumed)
    assert (outcome.done_before, outcome.computed, resumed.images) == (6, 6, 6)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished records untouched
    assert _without_timing(outcome.summary) == _without_timing(reference.summary)
    assert _records(tmp_path / "resumed") == _records(tmp_path / "full")

    again = CountingGenerate()
    assert run_eval(_settings(tmp_path / "resumed", tiny_model), generate_fn=again).computed == 0 and again.calls == 0


def test_partial_unit_is_regenerated_whole_but_only_missing_records_written(tiny_model, tmp_path):
    out = tmp_path / "run"
    run_eval(_settings(out, tiny_model, report=False), generate_fn=CountingGenerate())
    before = _records_from_jobs(out)
    victim = out / "jobs" / "cfg_w3" / "p00000_k001.json"
    victim.unlink()  # killed between the two records of unit 0
    counter = CountingGenerate()
    run_eval(_settings(out, tiny_model, report=False), generate_fn=counter)
    assert (counter.calls, counter.images) == (1, 2)
    assert _records_from_jobs(out) == before


def _records_from_jobs(out: Path) -> dict[str, dict]:
    return {r["job"]: summary.strip_timing(r) for r in summary.load_job_records(out)}


def test_resume_with_other_settings_is_refused(tiny_model, tmp_path):
    out = tmp_path / "run"
    run_eval(_settings(out, tiny_model, num_prompts=1, n=1, report=False))
    with pytest.raises(Exception, match="steps: stored 2, now 3"):
        run_eval(_settings(out, tiny_model, num_prompts=1, n=1, steps=3, report=False))
    run_file = out / "run.json"
    meta = json.loads(run_file.read_text())
    meta["model_fingerprint"] = "0" * 16  # the model was retrained since
    run_file.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="model_fingerprint"):
        run_eval(_settings(out, tiny_model, num_prompts=1, n=1, report=False))


# ---------------------------------------------------------------------------------------------
# Sharding


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed")
def test_two_processes_under_accelerate_match_one_process(tiny_model, tmp_path):
    args = ["--model", str(tiny_model), "--methods", "cfg@3,scfg+pag@3/1.5", "--num-prompts", "3", "--n", "1",
            "--steps", "2", "--batch", "1", "--min-real", "16", "--grid-prompts", "1", "--device", "cpu", "--quiet"]
    single = CliRunner().invoke(cli_main, ["eval", "run", *args, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "-m", "attnguide.cli", "eval", "run", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "records.jsonl").open()]
    assert sorted({(r["timing"]["rank"], r["timing"]["world_size"]) for r in two}) == [(0, 2), (1, 2)]
    assert _records(tmp_path / "two") == _records(tmp_path / "one")
    one_rows = json.loads((tmp_path / "one" / "summary.json").read_text())["rows"]
    two_rows = json.loads((tmp_path / "two" / "summary.json").read_text())["rows"]
    assert _without_timing(two_rows) == _without_timing(one_rows)


# ---------------------------------------------------------------------------------------------
# Metrics on known inputs


def test_frechet_of_identical_sets_is_zero_and_of_shifted_sets_is_the_shift():
    feats = np.random.default_rng(0).normal(size=(200, 8))
    assert metrics.frechet(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet(feats, feats + 2.0) == pytest.approx(8 * 4.0, rel=1e-6)
    assert metrics.frechet(feats[:1], feats) is None


def test_diversity_known_values():
    same = np.ones((4, 3))
    assert metrics.diversity(same, [0, 0, 1, 1]) == (0.0, 2)
    pts = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [0.0, 2.0], [9.0, 9.0]])
    # prompt 0: one pair at distance 5; prompt 1: one pair at 2; prompt 2 has a single sample (left out)
    assert metrics.diversity(pts, [0, 0, 1, 1, 2]) == (pytest.approx(3.5), 2)
    assert metrics.mean_pairwise_l2([[0.0], [1.0], [3.0]]) == pytest.approx((1 + 3 + 2) / 3)
    assert metrics.diversity(pts, [0, 1, 2, 3, 4]) == (None, 0)
    with pytest.raises(ValueError, match="groups"):
        metrics.diversity(pts, [0, 1])


def test_geneval_summary_of_handmade_scores():
    scores = [
        {"present": True, "colour_bound": True, "size_correct": None, "count_correct": True, "relation_correct": None, "fully_correct": True},
        {"present": True, "colour_bound": False, "size_correct": True, "count_correct": True, "relation_correct": True, "fully_correct": False},
        {"present": False, "colour_bound": False, "size_correct": False, "count_correct": False, "relation_correct": False, "fully_correct": False},
        {"present": True, "colour_bound": True, "size_correct": True, "count_correct": False, "relation_correct": None, "fully_correct": False},
    ]
    got = metrics.geneval_summary(scores)
    assert got["fully_correct"] == 0.25 and got["n_scored"] == 4
    assert got["fully_correct_se"] == pytest.approx((0.25 * 0.75 / 4) ** 0.5)
    assert (got["present"], got["colour_bound"], got["count_correct"]) == (0.75, 0.5, 0.5)
    assert (got["size_correct"], got["n_size_correct"]) == (pytest.approx(2 / 3), 3)
    assert (got["relation_correct"], got["n_relation_correct"]) == (0.5, 2)
    with pytest.raises(ValueError, match=r"scores\[0\]"):
        metrics.geneval_summary([{"present": True}])


def test_paired_difference_known_values():
    got = metrics.paired_difference([1, 1, 0, 1], [0, 1, 0, 0])  # differences 1, 0, 0, 1
    assert got["diff"] == 0.5 and got["n_pairs"] == 4
    assert got["diff_se"] == pytest.approx((1 / 3) ** 0.5 / 2)  # sample sd sqrt(1/3), over sqrt(4)
    assert got["z"] == pytest.approx(0.5 / ((1 / 3) ** 0.5 / 2))
    assert metrics.paired_difference([1, 0], [1, 0])["z"] is None  # no spread: z undefined, not infinite
    with pytest.raises(ValueError, match="equally long"):
        metrics.paired_difference([1, 0], [1])


def test_each_method_is_compared_with_the_methods_one_component_away():
    from attnguide.guidance import REGISTRY

    assert {name: REGISTRY[name].ablations for name in REGISTRY} == {
        "none": (), "cfg": ("none",), "pag": ("none",), "cfg+pag": ("cfg", "pag"), "scfg": ("cfg",),
        "scfg+pag": ("scfg", "cfg+pag"),
    }
    assert [c.label for c in Config("scfg+pag", 5.0, 2.0).ablations()] == ["scfg@5", "cfg+pag@5/2"]
    assert [c.label for c in Config("cfg+pag", 5.0, 2.0).ablations()] == ["cfg@5", "pag@2"]


def test_paired_rows_pair_images_by_prompt_and_sample():
    def record(config, p, k, fully, present):
        method, _, scale = config.partition("@")
        return {"config": config, "method": method, "guidance_scale": float(scale) if scale else None, "pag_scale": None,
                "prompt_index": p, "sample_index": k, "scores": {"fully_correct": fully, "present": present}}

    records = [record("none", 0, 0, False, False), record("none", 1, 0, True, True), record("none", 2, 0, False, True),
               record("cfg@5", 1, 0, True, True), record("cfg@5", 0, 0, True, True), record("cfg@5", 2, 0, True, True),
               record("cfg@7", 0, 0, True, True)]  # cfg@7 has only prompt 0 of none's three
    rows = summary.paired_rows(records, ["none", "cfg@5", "cfg@7"])
    got = {(r["config"], r["reference"], r["check"]): (r["diff"], r["n_pairs"]) for r in rows}
    assert got == {("cfg@5", "none", "fully_correct"): (pytest.approx(2 / 3), 3), ("cfg@5", "none", "present"): (pytest.approx(1 / 3), 3),
                   ("cfg@7", "none", "fully_correct"): (1.0, 1), ("cfg@7", "none", "present"): (1.0, 1)}
    assert "| cfg@5 − none | fully_correct | +0.667 ± 0.333 | +2.0 | 3 |" in summary.paired_markdown(rows)


def test_clip_scorer_needs_a_local_folder(tmp_path):
    with pytest.raises(ValueError, match="--clip.*does not exist"):
        metrics.ClipScorer(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--clip.*safetensors"):
        metrics.ClipScorer(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Report, file prompts, CLI


def test_report_rebuilds_summary_and_plots_from_records(tiny_model, tmp_path):
    out = tmp_path / "run"
    outcome = run_eval(_settings(out, tiny_model, n=1))
    records = [json.loads(line) for line in (out / "records.jsonl").open()]
    assert len(records) == 6 and all((out / r["image"]).is_file() for r in records)
    assert {"scores", "detected", "seed", "unet_evaluations", "timing", "prompt", "image"} <= set(records[0])
    assert any(r.get("mask_overlay") for r in records if r["method"] == "scfg+pag")
    assert (out / "paired.csv").read_text().startswith("config,reference,check,diff")  # no pairs in this run
    for name in ("summary.csv", "summary.md", "summary.json", "records.jsonl", "paired.csv"):
        (out / name).unlink()
    for plot in (out / "plots").glob("*.png"):
        plot.unlink()
    result = CliRunner().invoke(cli_main, ["eval", "report", str(out)])
    assert result.exit_code == 0, result.output
    assert "| cfg@3 |" in result.output
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert rows == outcome.summary
    assert {p.name for p in (out / "plots").glob("*.png")} == {"quality_alignment.png", "metrics_vs_scale.png", "grid.png"}
    assert [r["unet_evals_per_image"] for r in rows] == [4, 6]  # 2 steps x 2 or 3 branches


def test_scfg_levels_reach_every_job_and_are_fixed_for_the_run(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    from attnguide import attention

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    finest = (min(lay.factor for lay in attention.list_layers(unet) if lay.is_cross),)
    assert finest != tuple(attention.default_scfg_levels(unet))  # so the option changes something
    seen = []

    def recording(pipe, prompt, **kwargs):
        seen.append(kwargs["scfg"])
        return sampling.generate(pipe, prompt, **kwargs)

    out = tmp_path / "run"
    run_eval(_settings(out, tiny_model, num_prompts=1, n=1, scfg_levels=finest, report=False), generate_fn=recording)
    assert len(seen) == 2 and all(s["levels"] == finest for s in seen)
    assert json.loads((out / "run.json").read_text())["scfg_levels"] == list(finest)
    with pytest.raises(Exception, match=r"scfg_levels: stored \[\d+\], now None"):
        run_eval(_settings(out, tiny_model, num_prompts=1, n=1, report=False))


def test_bad_scfg_levels_are_refused_before_anything_is_written(tiny_model, tmp_path):
    result = CliRunner().invoke(cli_main, ["eval", "run", "--out", str(tmp_path / "o"), "--model", str(tiny_model),
                                           "--methods", "scfg@3", "--num-prompts", "1", "--steps", "1",
                                           "--scfg-levels", "64", "--device", "cpu", "--quiet"])
    assert result.exit_code == 2 and "--scfg-levels" in result.output and "available levels" in result.output
    assert not (tmp_path / "o" / "records.jsonl").exists()


def test_text_prompts_give_model_agnostic_metrics_only(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red circle\n\na blue square\n")
    outcome = run_eval(_settings(tmp_path / "run", tiny_model, prompts=str(prompts), num_prompts=None, n=1))
    assert [r["n_images"] for r in outcome.summary] == [2, 2]
    assert all(r.get("fully_correct") is None and r.get("fd") is None for r in outcome.summary)
    assert all(r["seconds_per_image"] > 0 for r in outcome.summary)


@pytest.mark.parametrize("args, message", [
    (["--methods", "cfg,foo"], "--methods"),
    (["--prompts", "no-such-file.txt"], "--prompts"),
    (["--scales", "1,x"], "--scales"),
    (["--clip", "no-such-dir"], "--clip"),
    (["--scfg-levels", "2,x"], "--scfg-levels"),
])
def test_cli_names_the_bad_parameter(tmp_path, args, message):
    result = CliRunner().invoke(cli_main, ["eval", "run", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2 and message in result.output


def test_report_of_a_folder_without_a_run_fails_clearly(tmp_path):
    result = CliRunner().invoke(cli_main, ["eval", "report", str(tmp_path)])
    assert result.exit_code == 1 and "not an evaluation folder" in result.output


# ---------------------------------------------------------------------------------------------
# Hardening: validation before writing, reuse after a failed start, lock, temporary files


@pytest.mark.parametrize("kw, option", [
    (dict(height=63), "--height"),
    (dict(pag_layers=("nomatch",)), "--pag-layers"),
    (dict(seed=2**32), "--seed"),
])
def test_bad_setting_is_refused_before_anything_is_written(tiny_model, tmp_path, kw, option):
    out = tmp_path / "run"
    counting = CountingGenerate()
    with pytest.raises(errors.BadInput, match=option) as info:
        run_eval(_settings(out, tiny_model, num_prompts=1, n=1, report=False, **kw), generate_fn=counting)
    assert info.value.exit_code == 2 and counting.calls == 0
    assert not (out / "run.json").exists() and not (out / "jobs").exists()
    # the corrected command then runs in the same folder
    run_eval(_settings(out, tiny_model, num_prompts=1, n=1, report=False))
    assert len(list((out / "jobs").glob("*/*.json"))) == 2


def test_eval_cli_bad_setting_is_one_line_and_folder_reusable(tiny_model, tmp_path):
    out = tmp_path / "o"
    base = ["eval", "run", "--model", str(tiny_model), "--methods", "cfg@3", "--num-prompts", "1", "--steps", "1",
            "--device", "cpu", "--quiet", "--no-report", "--out", str(out)]
    bad = CliRunner().invoke(cli_main, [*base, "--height", "63"])
    assert bad.exit_code == 2 and "--height" in bad.output and "Traceback" not in bad.output
    assert not (out / "run.json").exists()
    good = CliRunner().invoke(cli_main, base)
    assert good.exit_code == 0, good.output


def test_folder_of_a_failed_start_without_results_is_reused(tiny_model, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"model": "elsewhere", "steps": 99, "configs": ["cfg@9"]}))
    run_eval(_settings(out, tiny_model, num_prompts=1, n=1, report=False))
    assert json.loads((out / "run.json").read_text())["steps"] == 2


def test_second_process_on_a_locked_folder_fails_at_once(tiny_model, tmp_path):
    out = tmp_path / "run"
    counting = CountingGenerate()
    with storage.folder_lock(out):
        with pytest.raises(errors.BadInput, match="in use"):
            run_eval(_settings(out, tiny_model, num_prompts=1, n=1, report=False), generate_fn=counting)
    assert counting.calls == 0
    run_eval(_settings(out, tiny_model, num_prompts=1, n=1, report=False), generate_fn=counting)  # released
    assert counting.calls == len(CONFIGS)


def test_lock_excludes_a_second_process(tmp_path):
    code = ("import sys\nfrom pathlib import Path\nfrom attnguide.evaluation import storage\n"
            "try:\n    storage.folder_lock(Path(sys.argv[1])).__enter__()\nexcept Exception as e:\n    print(e)\n    sys.exit(3)\n")
    with storage.folder_lock(tmp_path / "run"):
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                              cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert done.returncode == 3 and "in use" in done.stdout, done.stdout + done.stderr


def test_stale_temp_files_are_cleaned_and_failed_writes_leave_none(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    stale = out / "jobs" / "cfg_w3" / ".p00000_k000.json.4242.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_text("half a record")
    run_eval(_settings(out, tiny_model, num_prompts=1, n=1, report=False))
    assert not stale.exists()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        storage.atomic_write_text(out / "x.json", "{}")
    assert not list(out.glob(".*.tmp")) and not (out / "x.json").exists()
