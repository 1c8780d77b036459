"""`make gpu-check` on a machine that cannot run it: it must stop at once with one line and a non-zero
status, never skip its way to a report that looks complete. (Where it can run, it needs TensorRT and a
GPU, which no machine running this suite has.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import ROOT


def test_the_python_check_stops_at_once_without_tensorrt() -> None:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0  # one line
    assert result.stderr.startswith("gpu-check: cannot run here: TensorRT is not installed")
    assert result.stdout == ""
    assert time.monotonic() - start < 30


def test_the_script_stops_at_once_without_a_gpu() -> None:
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # no nvidia-smi here
    result = subprocess.run(["make", "--no-print-directory", "gpu-check"], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=30)  # fmt: skip
    assert result.returncode != 0
    assert "gpu-check: cannot run here: no NVIDIA GPU" in result.stderr


def test_the_report_fails_loudly_when_the_tensorrt_tests_only_skip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The steps replaced by stand-ins (no GPU here): a TensorRT test run that skipped everything is a
    failure in the report and the exit status, not a pass."""
    from bench import gpu_check

    built = {"export_s": 1.0, "engine_build_s": 2.0, "engine_mb": 3.0, "tensorrt": "10.16.0", "gpu": "H100",
             "compute_capability": "9.0", "strongly_typed": True, "tf32": False}  # fmt: skip
    monkeypatch.setattr(gpu_check, "_export", lambda task, out: built)
    monkeypatch.setattr(gpu_check, "_parity", lambda out: [
        {"output": "logits", "batch": 1, "reference": "onnxruntime cuda fp16", "max_abs_diff": 1e-3, "relative": 1e-4}
    ])  # fmt: skip
    monkeypatch.setattr(gpu_check, "_serve_and_load", lambda out, route, seconds: [
        {"concurrency": 1, "images_per_s": 500.0, "p50_ms": 2.0, "p95_ms": 3.0, "host_cpu_ms_per_image": 4.0,
         "errors": 0}
    ])  # fmt: skip
    skipped = subprocess.CompletedProcess([], 0, stdout="s\n1 skipped in 0.10s\n", stderr="")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: skipped)
    report = gpu_check.run(seconds=1)
    assert report["failures"] == ["pytest -m tensorrt: 1 skipped in 0.10s"]
    path = tmp_path / "gpu_check.md"
    gpu_check.write_report(report, path)
    text = path.read_text()
    assert "**Result: FAILED**" in text
    assert "GPU H100 (sm 9.0), TensorRT 10.16.0" in text
    assert "| classify | 1 | 500.0 | 2.0 | 3.0 | 4.0 | 0 |" in text
    assert (tmp_path / "gpu_check.json").is_file()
