"""benchmarks/gpu.sh --dry-run: the prepared GPU benchmark, end to end on the CPU with the tiny models."""
import json
import os
import subprocess
import sys
from pathlib import Path

from attnguide.evaluation.bench import METHOD_NAMES, PEER_NAMES


def test_gpu_bench_dry_run(tmp_path):
    root = Path(__file__).resolve().parents[2]
    # An unlimited budget: the dry run checks the script end to end; how long a point takes on a busy
    # CPU (the budget's estimate) must not decide which points run.
    env = dict(os.environ, OUT=str(tmp_path / "out"), BUDGET_S="1e9")
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    table = (tmp_path / "out" / "gpu_bench.md").read_text()
    assert [(p["model"], p["batch"], p["status"]) for p in report["points"]] == [
        ("tiny", 1, "done"), ("tiny", 4, "done"), ("tiny-sdxl", 1, "done")]
    for point in report["points"]:
        configs = point["configs"]
        assert set(configs) == set(METHOD_NAMES) | set(PEER_NAMES) | {"diffusers-modular-pag"}
        for name, c in configs.items():
            if name == "diffusers-modular-pag" and point["model"] == "tiny":
                assert c["status"].startswith("skipped")  # SD 1.5: diffusers has no modular blocks
                continue
            assert c["status"] == "ok", (name, c)
            per_call = 1 if name == "diffusers-modular-pag" else report["meta"]["steps"]  # modular: no step callback
            assert c["step_ms_median"] > 0 and len(c["step_ms"]) == per_call * report["meta"]["repeats"]
        assert f"## {point['model']} 32x32, batch {point['batch']} — done" in table
    profile = report["points"][0]["profile"]
    for name, p in profile.items():
        assert p["unet"]["sdpa_calls"] == p["unet"]["sdpa_fused_kernels"] > 0 and p["unet"]["math_softmax"] == 0, name
    assert profile["pag"]["unet_x_cfg"] <= 1.0 and profile["cfg+pag"]["unet_x_cfg"] <= 1.5
    assert report["skipped"] == []


def test_gpu_bench_starts_nothing_past_its_budget(tmp_path):
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_bench.py"), "--out", str(tmp_path), "--dry-run",
                           "--budget-s", "0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["points"] == [] and len(report["skipped"]) == 3
