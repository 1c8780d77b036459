"""Session fixtures: the real exports the numerical and end-to-end tests share. Each is a micro Focal
(the golden fixtures' widths and depths), so an export takes seconds, not minutes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from export.options import ExportOptions
from export.pipeline import run_export
from focal.detection import FocalRetinaNet
from manifest import ClassifyManifest, DetectManifest
from tests.support import CLASSIFIER_KEYS, micro_kwargs

# Apps made in tests (and the servers they start) open no gRPC port unless a test asks for one:
# the default 8001 would collide between tests and with anything else on the machine.
os.environ["FOCAL_GRPC_PORT"] = "0"

DETECT_CANVAS = (128, 128)
HORSE = 17  # the class the constructed detector finds everywhere
HORSE_ANCHOR = 4  # of the 9 per cell: ratio 1, the middle octave scale


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the service's event loop (tests marked `anyio` run on it)


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)  # as the fixtures were made; also keeps CI timings stable


@dataclass(frozen=True)
class Export:
    folder: Path
    log: str


@dataclass(frozen=True)
class ClassifyExport(Export):
    manifest: ClassifyManifest


@dataclass(frozen=True)
class DetectExport(Export):
    manifest: DetectManifest
    checkpoint: Path


@pytest.fixture(scope="session")
def classify_export(tmp_path_factory: pytest.TempPathFactory) -> ClassifyExport:
    """A micro classifier (10 classes), random-init, with fp16: through `run_export`, as the CLI runs it."""
    folder = tmp_path_factory.mktemp("micro_classifier")
    lines: list[str] = []
    opts = ExportOptions(
        variant="focal_tiny", random_init=True, fp16=True, model_kwargs=micro_kwargs(keep=CLASSIFIER_KEYS), out=folder
    )
    manifest = run_export(opts, log=lines.append)
    assert isinstance(manifest, ClassifyManifest)
    return ClassifyExport(folder, "\n".join(lines), manifest)


@pytest.fixture(scope="session")
def detect_export(tmp_path_factory: pytest.TempPathFactory) -> DetectExport:
    """A micro Focal-RetinaNet whose output is known: head convolutions zeroed, so every location gives
    the class logits' bias and zero box deltas; the bias is high only for (anchor HORSE_ANCHOR, class
    HORSE). Its detections are therefore that anchor at every location, undistorted. Saved as an
    mmdetection checkpoint ({'meta', 'state_dict'}) and exported from it with --weights and --fp16."""
    from focal.detection import create_detector

    folder = tmp_path_factory.mktemp("constructed_detector")
    torch.manual_seed(0)
    model = create_detector("focal_tiny", DETECT_CANVAS, **micro_kwargs())
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
    lines: list[str] = []
    opts = ExportOptions(
        variant="focal_tiny",
        task="detect",
        weights=checkpoint,
        canvases=[DETECT_CANVAS],
        fp16=True,
        model_kwargs=micro_kwargs(),
        out=folder / "export",
    )
    manifest = run_export(opts, log=lines.append)
    assert isinstance(manifest, DetectManifest)
    return DetectExport(folder / "export", "\n".join(lines), manifest, checkpoint)


# The canvas-bucket detector: canvases whose pad-to-32 sizes mmdetection feeds the model at this test scale.
BUCKET_SCALE = (288, 224)
BUCKET_CANVASES = [(224, 224), (224, 288), (288, 224)]


def bucket_detector(canvas: tuple[int, int]) -> FocalRetinaNet:
    """The micro detector of `bucket_export` (3 classes) at a canvas, randomly initialised."""
    from focal import get_variant
    from focal.detection import RetinaNetConfig

    config = get_variant("focal_tiny").config(**micro_kwargs(), img_size=canvas, features_only=True)
    return FocalRetinaNet(config, RetinaNetConfig(num_classes=3)).eval()


@pytest.fixture(scope="session")
def bucket_export(tmp_path_factory: pytest.TempPathFactory) -> DetectExport:
    """A micro Focal-RetinaNet with 3 classes and random weights whose class logits spread widely (so
    scores far above 0.05 differ well beyond the export's rounding), saved as an mmdetection checkpoint
    and exported with three canvases at test scale 288x224 (fp32)."""
    folder = tmp_path_factory.mktemp("bucket_detector")
    torch.manual_seed(3)
    model = bucket_detector(BUCKET_CANVASES[0])
    head = model.bbox_head
    with torch.no_grad():
        head.retina_cls.weight.mul_(40.0)
        head.retina_cls.bias.fill_(-2.0)  # type: ignore[union-attr]
        head.retina_reg.weight.mul_(5.0)
    checkpoint = folder / "retinanet_buckets.pth"
    torch.save({"meta": {"note": "random, for tests"}, "state_dict": model.state_dict()}, checkpoint)
    labels = folder / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    lines: list[str] = []
    opts = ExportOptions(
        variant="focal_tiny",
        task="detect",
        weights=checkpoint,
        canvases=BUCKET_CANVASES,
        test_scale=BUCKET_SCALE,
        labels=labels,
        model_kwargs=micro_kwargs(),
        out=folder / "export",
    )
    manifest = run_export(opts, log=lines.append)
    assert isinstance(manifest, DetectManifest)
    return DetectExport(folder / "export", "\n".join(lines), manifest, checkpoint)
