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


DETECT_CANVAS = (320, 320)
HORSE = 17  # the class the constructed detector finds everywhere
HORSE_ANCHOR = 4  # of the 9 per cell: ratio 1, the middle octave scale


def _export_detector(out: Path, *args: str) -> tuple[Path, dict[str, Any], str]:
    size = f"{DETECT_CANVAS[0]}x{DETECT_CANVAS[1]}"
    result = run_cli("--variant", "focal_tiny", "--task", "detect", "--image-size", size, "--out", str(out), *args)
    assert result.returncode == 0, result.stderr
    return out, json.loads((out / "manifest.json").read_text()), result.stdout


@pytest.fixture(scope="session")
def detect_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """The issue's acceptance export: focal_tiny RetinaNet, random-init, 320x320 canvas (with fp16)."""
    return _export_detector(tmp_path_factory.mktemp("focal_tiny_detect"), "--random-init", "--fp16")


@pytest.fixture(scope="session")
def constructed_detect_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """A detector whose output is known: head convolutions zeroed, so every location gives the class
    logits' bias and zero box deltas; the bias is high only for (anchor HORSE_ANCHOR, class HORSE).
    Its detections are therefore that anchor at every location, undistorted. Saved as an mmdetection
    checkpoint ({'meta', 'state_dict'}) and exported from it with --weights."""
    from focal.detection import create_detector

    folder = tmp_path_factory.mktemp("constructed_detector")
    torch.manual_seed(0)
    model = create_detector("focal_tiny", DETECT_CANVAS)
    head = model.bbox_head
    with torch.no_grad():
        for conv in [*head.cls_convs, *head.reg_convs]:
            conv.conv.weight.zero_()
            conv.conv.bias.zero_()
        head.retina_reg.weight.zero_()
        head.retina_reg.bias.zero_()  # type: ignore[union-attr]
        head.retina_cls.weight.zero_()
        bias = head.retina_cls.bias
        assert bias is not None
        bias.fill_(-10.0)
        bias[HORSE_ANCHOR * head.num_classes + HORSE] = 8.0
    checkpoint = folder / "retinanet_constructed.pth"
    torch.save({"meta": {"note": "constructed for tests"}, "state_dict": model.state_dict()}, checkpoint)
    return _export_detector(folder / "export", "--weights", str(checkpoint))
