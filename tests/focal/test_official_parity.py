"""The model loaded through the public loader reproduces the official implementation's logits."""

from __future__ import annotations

import pytest
import torch

from focal import FocalTransformer, load_checkpoint
from tests.support import OFFICIAL_CASES, load_official_case

TOLERANCE = 1e-4  # max abs logit difference, fp32 CPU (fixtures README)


def test_all_fixture_cases_are_present() -> None:
    assert len(OFFICIAL_CASES) == 6


@pytest.mark.parametrize("name", OFFICIAL_CASES)
def test_matches_official_logits(name: str) -> None:
    case = load_official_case(name)
    model = FocalTransformer(**case.kwargs).eval()
    report = load_checkpoint(model, case.checkpoint)
    assert report.adaptations == []  # same size as made: nothing to adapt
    assert report.ignored_buffers > 0  # the official index buffers were there and were skipped
    with torch.inference_mode():
        logits = model(case.images)
        logits_b1 = model(case.images[:1])
    assert logits.shape == case.logits.shape
    assert (logits - case.logits).abs().max().item() <= TOLERANCE
    assert (logits_b1 - case.logits_b1).abs().max().item() <= TOLERANCE


def test_neighbor_key_order_matters() -> None:
    """The parity test is sensitive: reversing one block's 132 neighbour columns breaks it."""
    case = load_official_case("micro_256x320")
    model = FocalTransformer(**case.kwargs).eval()
    load_checkpoint(model, case.checkpoint)
    table = model.block(0, 0).attn.relative_position_bias_table_to_neighbors
    with torch.no_grad():
        table.copy_(table.flip(-1))
    with torch.inference_mode():
        logits = model(case.images)
    assert (logits - case.logits).abs().max().item() > 10 * TOLERANCE
