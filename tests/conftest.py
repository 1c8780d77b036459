from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_FIXTURES = Path(__file__).parent / "fixtures" / "official"
OFFICIAL_CASES = sorted(p.stem for p in OFFICIAL_FIXTURES.glob("*.json"))


@dataclass(frozen=True)
class OfficialCase:
    """A golden fixture made by the official implementation (see fixtures/official/README.md)."""

    name: str
    kwargs: dict[str, Any]
    checkpoint: Path
    images: torch.Tensor
    logits: torch.Tensor
    logits_b1: torch.Tensor


def load_official_case(name: str) -> OfficialCase:
    meta = json.loads((OFFICIAL_FIXTURES / f"{name}.json").read_text())
    arrays = np.load(OFFICIAL_FIXTURES / f"{name}.npz")
    return OfficialCase(
        name=name,
        kwargs=meta["official_kwargs"],
        checkpoint=OFFICIAL_FIXTURES / f"{name}.pth",
        images=torch.from_numpy(arrays["images"]),
        logits=torch.from_numpy(arrays["logits"]),
        logits_b1=torch.from_numpy(arrays["logits_b1"]),
    )


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)  # as the fixtures were made; also keeps CI timings stable


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m export ARGS` in a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "export", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """One real export of focal_tiny (random-init, with fp16), shared by the export and service tests."""
    out = tmp_path_factory.mktemp("focal_tiny")
    result = run_cli("--variant", "focal_tiny", "--random-init", "--fp16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, json.loads((out / "manifest.json").read_text()), result.stdout
