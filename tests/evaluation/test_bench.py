"""Smoke test of the benchmark (tiny model, 2 steps, 1 repeat): it runs every method and peer,
reports finite positive numbers and writes valid JSON. No timing assertions."""
import json
import math

import pytest
from click.testing import CliRunner

from attnguide.cli import main
from attnguide.evaluation.bench import METHOD_NAMES, PEER_NAMES, format_report


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_smoke(tmp_path):
    path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--model", "tiny", "--steps", "2", "--repeats", "1", "--warmup", "1",
                                       "--memory", "shared", "--json", str(path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads(path.read_text())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind
    (res,) = report["results"]
    assert (res["height"], res["width"]) == (32, 32)
    assert set(res["configs"]) == set(METHOD_NAMES) | set(PEER_NAMES)
    for name, c in res["configs"].items():
        assert len(c["step_s"]) == 2 and all(_positive(s) for s in c["step_s"]), name
        assert _positive(c["step_ms"]) and _positive(c["image_s"]), name
        mem = c["memory"]
        assert _positive(mem["denoise_peak_mb"]) and _positive(mem["run_peak_mb"]), name
        assert math.isfinite(mem["denoise_delta_mb"]) and math.isfinite(mem["run_delta_mb"]), name
        assert _positive(res["ratios"][name]["step"]), name
    assert res["ratios"]["cfg"]["step"] == 1.0
    assert {b["bar"] for b in res["bars"]} and all(_positive(b["ratio"]) for b in res["bars"])
    for name in METHOD_NAMES + PEER_NAMES:
        assert f"| {name} |" in result.output
    assert format_report(report) in result.output


@pytest.mark.parametrize("model, peers", [
    ("tiny-sd3", {"diffusers-cfg", "diffusers-pag", "diffusers-cfg+pag"}),
    ("tiny-flux", {"diffusers-cfg"}),  # diffusers has no Flux PAG class
])
def test_bench_runs_transformer_families(model, peers):
    from attnguide.evaluation.bench import run_benchmark

    report = run_benchmark(model, steps=2, repeats=1, warmup=0, memory="shared", progress=False)
    (res,) = report["results"]
    assert set(res["configs"]) == set(METHOD_NAMES) | peers
    assert set(report["meta"]["peers_unavailable"]) == set(PEER_NAMES) - peers
    for name, c in res["configs"].items():
        # one step end per step, also where Flux's true CFG calls the transformer twice per step
        assert len(c["step_s"]) == 2 and all(_positive(s) for s in c["step_s"]) and _positive(c["unet_ms"]), name
        assert _positive(c["memory"]["denoise_peak_mb"]), name


def test_segment_bench_smoke(tmp_path):
    """benchmarks/segment_bench.py runs on the tiny model and compares two module versions."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    copy = tmp_path / "segmentation_copy.py"
    copy.write_text((root / "attnguide" / "segmentation.py").read_text())
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "segment_bench.py"), "--model", "tiny",
                          "--rounds", "1", "--compare", str(copy)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "max score difference 0.00e+00; masks equal: True" in out.stdout
    assert "compared: median" in out.stdout and "current: median" in out.stdout


def test_bench_profile_prints_attention_kernels():
    """--profile: the op profile per method after the timing (SDPA calls = fused kernels, no math path)."""
    result = CliRunner().invoke(main, ["bench", "--model", "tiny", "--steps", "1", "--repeats", "1", "--warmup", "0",
                                       "--memory", "off", "--no-peers", "--methods", "cfg,pag,scfg", "--profile"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "### attention op profile and FLOPs per step" in result.output
    assert "| pag | 14 / 14 / 0 / 0 | 0 / 0 / 0 / 0 | 0 / 0 / 0 / 0 | 0 / 0 / 0 / 0 | 2, " in result.output
    assert "| scfg | 14 / 14 / 0 / 0 | 0 / 0 / 0 / 0 | 0 / 0 / 0 / 4 |" in result.output
