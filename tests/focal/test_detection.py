"""Focal-RetinaNet: anchors, candidate selection and decoding, mmdetection checkpoints.

Every check compares against a plain, loop-based reference written here from
mmdetection's definitions, not against the code under test.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from focal import CheckpointAdaptationWarning, CheckpointError, create_model
from focal.anchors import AnchorSpec, level_sizes
from focal.detection import (
    FocalRetinaNet,
    create_detector,
    decode_boxes,
    is_detection_state_dict,
    load_backbone_weights,
    load_detection_checkpoint,
)
from tests.support import reference_anchors

CANVAS = (128, 192)


def test_anchors_follow_mmdetection() -> None:
    spec = AnchorSpec()
    assert level_sizes((320, 320)) == [(40, 40), (20, 20), (10, 10), (5, 5), (3, 3)]
    assert level_sizes((800, 1344)) == [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
    for size, stride in [((3, 5), 8), ((2, 2), 128)]:
        np.testing.assert_allclose(spec.level_anchors(size, stride), reference_anchors(size, stride), rtol=1e-12)


def reference_select(logits: np.ndarray, deltas: np.ndarray, anchors: np.ndarray, k: int) -> np.ndarray:
    """One image, one level: top-k (anchor, class) pairs by logit, decoded one by one."""
    classes = logits.shape[1]
    flat = logits.reshape(-1)
    order = sorted(range(len(flat)), key=lambda i: -flat[i])[:k]
    rows = []
    for index in order:
        a, c = divmod(index, classes)
        (x1, y1, x2, y2), (dx, dy, dw, dh) = anchors[a], deltas[a]
        w, h = x2 - x1, y2 - y1
        cx, cy = (x1 + x2) / 2 + dx * w, (y1 + y2) / 2 + dy * h
        clip = abs(math.log(16 / 1000))
        w, h = w * math.exp(min(max(dw, -clip), clip)), h * math.exp(min(max(dh, -clip), clip))
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        box = [min(max(v, 0.0), CANVAS[1] if n % 2 == 0 else CANVAS[0]) for n, v in enumerate(box)]
        rows.append([*box, 1 / (1 + math.exp(-flat[index])), c])
    return np.asarray(rows)


def test_selection_and_decoding_match_a_plain_reference() -> None:
    torch.manual_seed(0)
    model = create_detector("focal_tiny", CANVAS)
    generator = torch.Generator().manual_seed(1)
    raw = []
    for size in model.level_sizes:
        count = size[0] * size[1] * 9
        # Large deltas too, so the log-size clamp and the canvas clipping are exercised.
        raw.append((torch.randn(2, count, 80, generator=generator), 3 * torch.randn(2, count, 4, generator=generator)))
    with torch.inference_mode():
        rows = model.select_and_decode(raw).numpy()
    assert rows.shape == (2, model.num_candidates, 6)
    spec, start = AnchorSpec(), 0
    for level, (size, stride) in enumerate(zip(model.level_sizes, spec.strides, strict=True)):
        k = model.level_candidates[level]
        anchors = reference_anchors(size, stride)
        for b in range(2):
            expected = reference_select(raw[level][0][b].numpy(), raw[level][1][b].double().numpy(), anchors, k)
            np.testing.assert_allclose(rows[b, start : start + k], expected, rtol=1e-5, atol=2e-4)
        start += k
    # One box by hand: centre moves by d * size, size scales by exp(d) (clamped), clipped to the canvas.
    decoded = decode_boxes(
        torch.tensor([[16.0, 8.0]], dtype=torch.float64),
        torch.tensor([[32.0, 16.0]], dtype=torch.float64),
        torch.tensor([[0.5, -0.25, 0.1, 10.0]], dtype=torch.float64),
        torch.tensor([CANVAS[1], CANVAS[0]], dtype=torch.float64),
    ).numpy()
    half_w = 16 * math.exp(0.1)
    np.testing.assert_allclose(decoded, [[32 - half_w, 0, 32 + half_w, CANVAS[0]]], rtol=1e-12)


def mmdet_checkpoint(model: FocalRetinaNet, path: Path) -> Path:
    """What mmdetection saves: {'meta': ..., 'state_dict': ...} under its own key names."""
    torch.save({"meta": {"mmdet_version": "2.25.0", "epoch": 12}, "state_dict": model.state_dict()}, path)
    return path


def test_mmdetection_checkpoint_loads_strictly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_detector("focal_tiny", CANVAS)
    shapes = {k: tuple(v.shape) for k, v in source.state_dict().items()}
    # mmdetection's names and shapes for RetinaNet (FPN in 192/384/768, 256 channels, 9 anchors x 80 classes).
    expected: dict[str, tuple[int, ...]] = {}
    for i, cin in enumerate((192, 384, 768)):
        expected |= {
            f"neck.lateral_convs.{i}.conv.weight": (256, cin, 1, 1),
            f"neck.lateral_convs.{i}.conv.bias": (256,),
        }
    for i, cin in enumerate((256, 256, 256, 768, 256)):  # fpn_convs.3 is the extra conv on C5 ('on_input')
        expected |= {f"neck.fpn_convs.{i}.conv.weight": (256, cin, 3, 3), f"neck.fpn_convs.{i}.conv.bias": (256,)}
    for branch in ("cls_convs", "reg_convs"):
        for i in range(4):
            expected |= {
                f"bbox_head.{branch}.{i}.conv.weight": (256, 256, 3, 3),
                f"bbox_head.{branch}.{i}.conv.bias": (256,),
            }
    expected |= {"bbox_head.retina_cls.weight": (720, 256, 3, 3), "bbox_head.retina_cls.bias": (720,)}
    expected |= {"bbox_head.retina_reg.weight": (36, 256, 3, 3), "bbox_head.retina_reg.bias": (36,)}
    assert {k: v for k, v in shapes.items() if not k.startswith("backbone.")} == expected
    classifier = {k for k in create_model("focal_tiny").state_dict() if not k.startswith(("head.", "norm."))}
    norms = {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    assert {k.removeprefix("backbone.") for k in shapes if k.startswith("backbone.")} == classifier | norms
    path = mmdet_checkpoint(source, tmp_path / "retinanet.pth")
    torch.manual_seed(1)
    target = create_detector("focal_tiny", CANVAS)
    report = load_detection_checkpoint(target, path)
    assert report.adaptations == []
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key

    state = source.state_dict()
    del state["neck.fpn_convs.2.conv.weight"]
    state["bbox_head.extra.weight"] = torch.zeros(1)
    state["bbox_head.retina_cls.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as failure:
        load_detection_checkpoint(target, {"state_dict": state})
    message = str(failure.value)
    for fragment in (
        "missing keys (1)",
        "neck.fpn_convs.2.conv.weight",
        "unexpected keys (1)",
        "bbox_head.extra.weight",
    ):
        assert fragment in message
    assert "bbox_head.retina_cls.bias: checkpoint (3,) vs model (720,)" in message


def test_backbone_weights_come_from_a_classification_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = create_model("focal_tiny")
    path = tmp_path / "focal-tiny.pth"
    torch.save({"model": classifier.state_dict()}, path)
    detector = create_detector("focal_tiny", (224, 224))  # the classifier's size: nothing to resize
    assert not is_detection_state_dict(classifier.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointAdaptationWarning)
        report = load_backbone_weights(detector, path)
    assert any("head.weight" in note for note in report.adaptations)  # the classifier head is dropped
    assert caught
    for key, value in classifier.state_dict().items():
        if not key.startswith(("head.", "norm.")):
            assert torch.equal(detector.backbone.state_dict()[key], value), key


def test_canvas_must_be_multiples_of_32() -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        create_detector("focal_tiny", (320, 300))
