"""Focal-fast (the official v2 family): parity with the official v2 code on its golden fixtures, the
top-K index buffers as the checkpoint's definition of the model, sizes, variants and MACs."""

from __future__ import annotations

import pickle
import warnings
from typing import Any

import pytest
import torch

from focal import CheckpointAdaptationWarning, CheckpointError, FocalTransformer, create_model, load_checkpoint
from focal.checkpoint import read_state_dict
from focal.info import describe
from focal.model import FocalFastAttention
from focal.topk import TopKGeometry, coordinates, selection_problem, squared_distances
from tests.support import OFFICIAL_V2_CASES, load_official_case

RELATIVE_TOLERANCE = 1e-5  # of the largest logit (issue 12); the model reaches ~5e-7


def _relative_error(logits: torch.Tensor, expected: torch.Tensor) -> float:
    return float((logits - expected).abs().max() / expected.abs().max())


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(images)
    return out


def _fast_attentions(model: torch.nn.Module) -> dict[str, FocalFastAttention]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FocalFastAttention)}


def test_all_v2_fixture_cases_are_present() -> None:
    assert OFFICIAL_V2_CASES == ["v2_micro_224", "v2_micro_224x448", "v2_micro_448", "v2_micro_depth2_224"]


@pytest.mark.parametrize("name", OFFICIAL_V2_CASES)
def test_matches_official_v2_logits(name: str) -> None:
    """create_model + load_checkpoint on the official file (which has no coordinate buffers)."""
    case = load_official_case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointAdaptationWarning)  # same size as made: nothing to adapt
        model = create_model("focal_fast_tiny", **case.kwargs)
        report = load_checkpoint(model, case.checkpoint)
    assert report.adaptations == []
    assert report.ignored_buffers > 0  # window_coords: read by the official forward, never used
    assert _relative_error(_logits(model, case.images), case.logits) <= RELATIVE_TOLERANCE
    assert _relative_error(_logits(model, case.images[:1]), case.logits_b1) <= RELATIVE_TOLERANCE


def test_official_keywords_alone_build_focal_fast() -> None:
    """`focal_topK` exists only in the v2 constructor: its keywords build Focal-fast as they are."""
    case = load_official_case("v2_micro_224")
    model = FocalTransformer(**case.kwargs).eval()
    assert model.config.family == "focal_fast"
    load_checkpoint(model, case.checkpoint)
    assert _relative_error(_logits(model, case.images), case.logits) <= RELATIVE_TOLERANCE


def test_official_rule_reproduces_the_fixtures_selection() -> None:
    """Built without a checkpoint, the selections are torch.topk's, as the official constructor's
    under this torch: a file without index buffers still gives the official logits (with a warning)."""
    case = load_official_case("v2_micro_448")
    state = read_state_dict(case.checkpoint)
    model = FocalTransformer(**case.kwargs).eval()
    for name, attn in _fast_attentions(model).items():
        for level, indices in enumerate(attn.selections()):
            assert torch.equal(indices, state[f"{name}.topk_cloest_indice_{level}"])
    without = {k: v for k, v in state.items() if ".topk_cloest_indice_" not in k}
    with pytest.warns(CheckpointAdaptationWarning) as caught:
        report = load_checkpoint(model, without)
    assert len(caught) == len(report.adaptations) == sum(".topk_cloest_indice_" in k for k in state)
    assert "topk_cloest_indice_0: the checkpoint has none; each window's 128 nearest tokens" in report.adaptations[0]
    assert _relative_error(_logits(model, case.images), case.logits) <= RELATIVE_TOLERANCE


def _stable_selection(attn: FocalFastAttention, level: int) -> torch.Tensor:
    """The K nearest with ties broken by lowest index: a valid selection, but not torch.topk's."""
    g = attn.topk_geom
    order = squared_distances(g, level).argsort(dim=1, stable=True)
    return order[:, : g.level_keys[level]]


def test_checkpoint_indices_define_the_model() -> None:
    """Another valid tie-break (a stable sort) loads, is used, and moves the logits far past the tolerance;
    so the parity above depends on using the checkpoint's own indices."""
    case = load_official_case("v2_micro_224")
    state = read_state_dict(case.checkpoint)
    model = FocalTransformer(**case.kwargs).eval()
    key = "layers.0.blocks.0.attn.topk_cloest_indice_0"
    attn = _fast_attentions(model)["layers.0.blocks.0.attn"]
    stable = _stable_selection(attn, 0)
    assert not torch.equal(stable.sort(dim=1).values, state[key].sort(dim=1).values)  # the sets differ
    load_checkpoint(model, {**state, key: stable})
    assert torch.equal(attn.topk_cloest_indice_0, stable)
    assert _relative_error(_logits(model, case.images), case.logits) > 100 * RELATIVE_TOLERANCE


def test_order_within_a_selection_does_not_matter() -> None:
    case = load_official_case("v2_micro_224x448")
    state = read_state_dict(case.checkpoint)
    shuffled = dict(state)
    generator = torch.Generator().manual_seed(0)
    for key, value in state.items():
        if ".topk_cloest_indice_" in key:
            shuffled[key] = value[:, torch.randperm(value.shape[1], generator=generator)]
    model = FocalTransformer(**case.kwargs).eval()
    load_checkpoint(model, shuffled)
    assert _relative_error(_logits(model, case.images), case.logits) <= RELATIVE_TOLERANCE


def _with_coordinates(state: dict[str, torch.Tensor], model: FocalTransformer) -> dict[str, torch.Tensor]:
    """The checkpoint as the released files hold it: with the derived `topk_cloest_coords_{k}`."""
    full = dict(state)
    for name, attn in _fast_attentions(model).items():
        for level in range(len(attn.topk_geom.level_keys)):
            indices = state[f"{name}.topk_cloest_indice_{level}"]
            full[f"{name}.topk_cloest_coords_{level}"] = coordinates(indices, attn.topk_geom, level)
    return full


def test_coordinate_buffers_of_real_checkpoints_are_checked_and_dropped() -> None:
    case = load_official_case("v2_micro_depth2_224")
    state = read_state_dict(case.checkpoint)
    model = FocalTransformer(**case.kwargs).eval()
    full = _with_coordinates(state, model)
    report = load_checkpoint(model, full)
    assert report.adaptations == []
    blocks = len(_fast_attentions(model))
    assert report.ignored_buffers == (len(full) - len(state)) + blocks  # the coordinates and window_coords
    assert _relative_error(_logits(model, case.images), case.logits) <= RELATIVE_TOLERANCE

    key = "layers.2.blocks.1.attn.topk_cloest_coords_1"
    with pytest.raises(CheckpointError, match=key):
        load_checkpoint(model, {**full, key: -full[key]})  # key minus query: the wrong sign


def test_fixture_coordinates_match_the_documented_formula() -> None:
    """Spot checks of `coordinates` against the fixtures README's definition (query minus key, in tokens)."""
    g = TopKGeometry(height=56, width=56, window=7, expand=0, focal_window=7, pooled=True, top_k=128)
    window, token = 9, 10  # window (1, 1); token (1, 3) inside it -> map position (8, 10)
    level0 = torch.tensor([[0] * 128] * 64)
    level0[window, 5] = 3 * 56 + 4  # key token (3, 4)
    assert coordinates(level0, g, 0)[window, token, 5].tolist() == [5.0, 6.0]
    level1 = torch.tensor([[0] * 64] * 64)
    level1[window, 2] = 2 * 8 + 3  # pooled window (2, 3), centre token (17, 24)
    assert coordinates(level1, g, 1)[window, token, 2].tolist() == [-9.0, -14.0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: torch.cat([t[:, :1], t[:, :-1]], dim=1), "same key twice"),
        (lambda t: t.index_put((torch.tensor(0), torch.tensor(-1)), torch.tensor(56 * 56 - 1)), "window 0 keeps"),
        (lambda t: t + 56 * 56, "out of range"),
    ],
)
def test_invalid_index_buffers_are_refused_with_the_key(change: Any, message: str) -> None:
    case = load_official_case("v2_micro_224")
    state = read_state_dict(case.checkpoint)
    key = "layers.0.blocks.0.attn.topk_cloest_indice_0"
    model = FocalTransformer(**case.kwargs).eval()
    bad = change(state[key])
    assert selection_problem(bad, _fast_attentions(model)["layers.0.blocks.0.attn"].topk_geom, 0)
    with pytest.raises(CheckpointError, match=f"{key}: not a valid top-K selection.*{message}"):
        load_checkpoint(model, {**state, key: bad})
    attn = model.block(0, 0).attn
    before = (attn.topk_cloest_indice_0.clone(), attn.key_index.clone())
    with pytest.raises(ValueError, match=message):  # also through plain load_state_dict, before the block changes
        model.load_state_dict({**model.state_dict(), key: bad})
    assert torch.equal(attn.topk_cloest_indice_0, before[0])
    assert torch.equal(attn.key_index, before[1])


def test_a_file_without_selections_gets_the_official_ones_whatever_the_model_held() -> None:
    case = load_official_case("v2_micro_224")
    state = read_state_dict(case.checkpoint)
    model = FocalTransformer(**case.kwargs).eval()
    key = "layers.0.blocks.0.attn.topk_cloest_indice_0"
    load_checkpoint(model, {**state, key: _stable_selection(_fast_attentions(model)["layers.0.blocks.0.attn"], 0)})
    with pytest.warns(CheckpointAdaptationWarning):
        load_checkpoint(model, {k: v for k, v in state.items() if ".topk_cloest_indice_" not in k})
    assert torch.equal(model.block(0, 0).attn.topk_cloest_indice_0, state[key])  # the official rule's, not the stable
    assert _relative_error(_logits(model, case.images), case.logits) <= RELATIVE_TOLERANCE


def test_a_checkpoint_of_the_transposed_size_is_adapted_not_refused() -> None:
    """224x448 and 448x224 have the same buffer shapes; the selections only fit the transposed maps."""
    case = load_official_case("v2_micro_224x448")
    model = create_model("focal_fast_tiny", **{**case.kwargs, "img_size": (448, 224)})
    with pytest.warns(CheckpointAdaptationWarning) as caught:
        report = load_checkpoint(model, case.checkpoint)
    assert any("made for the transposed size" in note for note in report.adaptations)
    assert len(caught) == len(report.adaptations)


def test_window_offsets_of_a_file_are_checked() -> None:
    case = load_official_case("v2_micro_224")
    state = read_state_dict(case.checkpoint)
    key = "layers.1.blocks.0.attn.window_coords"
    model = FocalTransformer(**case.kwargs).eval()
    with pytest.raises(CheckpointError, match=f"{key}: not the in-window offsets"):
        load_checkpoint(model, {**state, key: state[key].flip(-1)})


def test_a_focal_fast_model_pickles() -> None:
    """The load hooks are module-level functions: a whole model can be pickled (torch.save, spawn)."""
    case = load_official_case("v2_micro_224")
    model = FocalTransformer(**case.kwargs).eval()
    load_checkpoint(model, case.checkpoint)
    again = pickle.loads(pickle.dumps(model))
    assert torch.equal(_logits(again, case.images), _logits(model, case.images))


def test_a_checkpoint_of_another_size_gets_the_official_rule_with_warnings() -> None:
    case = load_official_case("v2_micro_224")
    model = create_model("focal_fast_tiny", **{**case.kwargs, "img_size": 448})
    with pytest.warns(CheckpointAdaptationWarning) as caught:
        report = load_checkpoint(model, case.checkpoint)
    assert len(report.adaptations) == len(caught) > 0
    assert all("made for another size" in note for note in report.adaptations)
    assert _logits(model, torch.zeros(1, 3, 448, 448)).shape == (1, 10)


def test_state_dict_round_trip_keeps_the_official_buffer_names() -> None:
    case = load_official_case("v2_micro_224")
    model = FocalTransformer(**case.kwargs).eval()
    load_checkpoint(model, case.checkpoint)
    state = model.state_dict()
    assert "layers.0.blocks.0.attn.topk_cloest_indice_1" in state
    assert not any(".coordinate_grid" in k or ".bias_index" in k or ".key_index" in k for k in state)
    again = FocalTransformer(**case.kwargs).eval()
    again.load_state_dict(state, strict=True)
    assert torch.equal(_logits(again, case.images), _logits(model, case.images))


@pytest.mark.parametrize(("size", "stage"), [((256, 320), "stage 1: a 64x80"), ((192, 192), "stage 1: a 48x48")])
def test_sizes_the_official_v2_code_cannot_run_are_refused(size: tuple[int, int], stage: str) -> None:
    with pytest.raises(ValueError, match=f"does not work with Focal-fast: {stage}.*multiples of 224"):
        create_model("focal_fast_tiny", img_size=size)


def test_focal_top_k_belongs_to_focal_fast_only() -> None:
    with pytest.raises(ValueError, match="focal_topK is an argument of Focal-fast"):
        create_model("focal_tiny", focal_topK=128)
    with pytest.raises(NotImplementedError, match="detection backbone"):
        create_model("focal_fast_tiny", features_only=True)
    # Accepted and unused, as by the official v2 constructor (v1 would refuse both).
    create_model("focal_fast_tiny", num_classes=0, focal_windows=[2, 2, 2, 2], expand_sizes=[9, 9, 9, 9])


def test_released_variants_official_macs() -> None:
    """MACs by the v2 file's own flops() (parameter counts: tests/focal/test_model.py)."""
    expected = {"focal_fast_tiny": 5.32, "focal_fast_small": 9.88, "focal_fast_base": 17.03}
    for name, gmacs in expected.items():
        assert round(describe(create_model(name).config).macs / 1e9, 2) == gmacs
    assert [s["keys_per_query"] for s in describe(create_model("focal_fast_tiny").config).stages] == [
        [192],
        [144],
        [132],
        [50],
    ]
    assert create_model("focalv2_tiny_patch4_window7_224", num_classes=0).config.family == "focal_fast"  # YAML name
    alias = create_model("focalv2_tiny_useconv_patch4_window7_224", num_classes=0)
    assert alias.config.family == "focal_fast"
    assert alias.config.focal_topK == 128
