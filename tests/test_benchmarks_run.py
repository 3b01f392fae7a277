"""Every benchmark runs once (pytest-benchmark's --benchmark-disable: each body once, no timing), so a
benchmark that breaks is a failing test here, not a surprise on a lent GPU. (Found on the H200,
2026-12-04: the LoRA benchmark read layer.parameters() of its functional layers, and 7 of its rows
failed there and on the CPU; nothing ran the benchmarks between GPU calls.)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_benchmark_runs_once():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # as users run them: the Triton rows skip on the CPU
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-disable", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "failed" not in proc.stdout.splitlines()[-1], tail
