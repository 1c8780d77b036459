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


def test_the_report_fails_loudly_on_skipped_tests_bad_parity_and_failed_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The steps replaced by stand-ins (no GPU here): a TensorRT test run that skipped everything, a
    detector outside the parity limit and a load level with failed requests are each a failure in the
    report and the exit status, never a pass."""
    from bench import gpu_check

    built = {"export_s": 1.0, "engine_build_s": 2.0, "engine_mb": 3.0, "tensorrt": "10.16.0", "gpu": "H100",
             "compute_capability": "9.0", "strongly_typed": True, "tf32": False}  # fmt: skip

    def parity(out: Path) -> list[dict[str, object]]:
        ok = out.name == "classify"
        return [{"output": "rows", "batch": 1, "reference": "onnxruntime cuda fp16", "measure": "m",
                 "value": 1e-3 if ok else 0.5, "agreement": None if ok else 0.9, "ok": ok}]  # fmt: skip

    def load(out: Path, route: str, seconds: float) -> list[dict[str, object]]:
        return [{"concurrency": 1, "avg_batch": 1.0, "images_per_s": 500.0, "p50_ms": 2.0, "p95_ms": 3.0,
                 "host_cpu_ms_per_image": 4.0, "errors": 0 if route == "/classify" else 3}]  # fmt: skip

    monkeypatch.setattr(gpu_check, "_export", lambda task, out: built)
    monkeypatch.setattr(gpu_check, "_parity", parity)
    monkeypatch.setattr(gpu_check, "_serve_and_load", load)
    skipped = subprocess.CompletedProcess([], 0, stdout="s\n1 skipped in 0.10s\n", stderr="")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: skipped)
    report = gpu_check.run(seconds=1)
    assert report["failures"][0] == "pytest -m tensorrt: 1 skipped in 0.10s"
    assert report["failures"][1].startswith("detect: parity at batch 1: m 0.5 (limit 0.01)")
    assert report["failures"][2].startswith("detect: load at concurrency 1: failed requests")
    assert len(report["failures"]) == 3
    path = tmp_path / "gpu_check.md"
    gpu_check.write_report(report, path)
    text = path.read_text()
    assert "**Result: FAILED**" in text
    assert "GPU H100 (sm 9.0, driver ?), TensorRT 10.16.0" in text
    assert "(strongly typed: True, TF32: False)" in text
    assert "| classify | 1 | 1.0 | 500.0 | 2.0 | 3.0 | 4.0 | 0 |" in text
    assert "| detect | rows | 1 | onnxruntime cuda fp16 | m | 0.5 | 90.0% | NO |" in text
    assert (tmp_path / "gpu_check.json").is_file()
