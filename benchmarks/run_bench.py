"""Thin wrapper: ``python benchmarks/run_bench.py --model tiny`` == ``attnguide bench --model tiny``.

See ``attnguide.evaluation.bench`` (and ``BENCHMARKS.md``) for what is measured and how.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from attnguide.evaluation.bench import bench  # noqa: E402

if __name__ == "__main__":
    bench()
