from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from focal import CheckpointAdaptationWarning, CheckpointError, FocalTransformer, create_model, load_checkpoint
from focal.checkpoint import adapt_state_dict, read_state_dict
from tests.support import load_official_case


def _micro_224(**overrides: object) -> FocalTransformer:
    return FocalTransformer(**{**load_official_case("micro_224").kwargs, **overrides}).eval()


def test_bare_state_dict_and_safetensors_load_the_same(tmp_path: Path) -> None:
    case = load_official_case("micro_224")
    state = read_state_dict(case.checkpoint)
    bare = tmp_path / "bare.pth"
    torch.save(state, bare)
    st = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    outputs = []
    for path in (case.checkpoint, bare, st):
        model = _micro_224()
        load_checkpoint(model, path)
        with torch.inference_mode():
            outputs.append(model(case.images))
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(outputs[0], outputs[2])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(_micro_224(), tmp_path / "nope.pth")


def test_truncated_file(tmp_path: Path) -> None:
    data = load_official_case("micro_224").checkpoint.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(_micro_224(), path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("hello, these are not weights\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(_micro_224(), path)
    st = tmp_path / "bad.safetensors"
    st.write_text("{}")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(_micro_224(), st)


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.mkdir, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": _RunsCode(str(marker))}}, evil)
    with pytest.raises(CheckpointError, match=r"refused to load: the file would have to import and run '\w+\.mkdir'"):
        load_checkpoint(_micro_224(), evil)
    raw = tmp_path / "raw_pickle.pth"  # not even a torch file: refused as unreadable
    with raw.open("wb") as f:
        pickle.dump({"model": {"x": _RunsCode(str(marker))}}, f)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(_micro_224(), raw)
    assert not marker.exists()


def test_wrong_variant_lists_the_mismatches() -> None:
    depth2 = load_official_case("micro_depth2_224")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_micro_224(), depth2.checkpoint)
    message = str(info.value)
    assert "another variant" in message
    assert "unexpected keys" in message
    assert "layers.0.blocks.1.attn.qkv.weight" in message
    wide = _micro_224(embed_dim=16)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(wide, load_official_case("micro_224").checkpoint)


def test_other_num_classes_drops_the_head_with_a_warning() -> None:
    case = load_official_case("micro_224")
    model = _micro_224(num_classes=3)
    head_before = model.head.weight.clone()
    with pytest.warns(CheckpointAdaptationWarning, match=r"head: dropped \(checkpoint has 10 classes, model has 3\)"):
        load_checkpoint(model, case.checkpoint)
    assert torch.equal(model.head.weight, head_before)
    reference = _micro_224()
    load_checkpoint(reference, case.checkpoint)
    assert torch.equal(model.block(0, 0).attn.qkv.weight, reference.block(0, 0).attn.qkv.weight)


def test_224_checkpoint_into_384_model_zero_fills_the_stage4_neighbor_table() -> None:
    case = load_official_case("micro_224")
    model = _micro_224(img_size=384)
    with pytest.warns(CheckpointAdaptationWarning, match="initialised to zeros") as record:
        load_checkpoint(model, case.checkpoint)
    assert len(record) == 1  # only stage 4 (12x12 at 384) gains a neighbour ring
    table = model.block(3, 0).attn.relative_position_bias_table_to_neighbors
    assert torch.count_nonzero(table) == 0
    with torch.inference_mode():
        assert torch.isfinite(model(torch.randn(1, 3, 384, 384))).all()


def test_224_checkpoint_into_192_model_resizes_the_clamped_window_tables() -> None:
    case = load_official_case("micro_224")
    model = _micro_224(img_size=192)  # stage 4 is 6x6: window 6
    with pytest.warns(CheckpointAdaptationWarning, match="resized") as record:
        load_checkpoint(model, case.checkpoint)
    resized = sorted(str(w.message).split(": ")[1] for w in record)
    assert resized == [
        "layers.3.blocks.0.attn.relative_position_bias_table",
        "layers.3.blocks.0.attn.relative_position_bias_table_to_windows.0",
        "layers.3.blocks.0.pool_layers.0.weight",
    ]
    pool = model.block(3, 0).pool_layers[0].weight
    original = read_state_dict(case.checkpoint)["layers.3.blocks.0.pool_layers.0.weight"]
    assert pool.shape == (1, 36)
    assert torch.isclose(pool.sum(), original.sum(), atol=1e-5)


def test_192_checkpoint_into_224_model_resizes_back() -> None:
    """The other direction: the 192 fixture (window 6 in stage 4) into a 224 model (window 7)."""
    case = load_official_case("micro_192")
    model = _micro_224()
    with pytest.warns(CheckpointAdaptationWarning, match="resized"):
        load_checkpoint(model, case.checkpoint)
    assert model.block(3, 0).attn.relative_position_bias_table.shape == (169, 8)


def test_index_buffers_are_checked_against_our_layout() -> None:
    case = load_official_case("micro_224")
    state = read_state_dict(case.checkpoint)
    model = _micro_224()
    _, notes, dropped = adapt_state_dict(state, model)
    assert notes == []
    assert dropped == sum(1 for k in state if "index" in k or "valid_ind" in k)
    key = "layers.0.blocks.0.attn.relative_position_index"
    state[key] = state[key].flip(0)
    _, notes, _ = adapt_state_dict(state, model)
    assert len(notes) == 1
    assert key in notes[0]


def test_checkpoint_holding_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint(_micro_224(), path)
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="not tensors"):
        load_checkpoint(_micro_224(), path)


def test_create_model_loads_a_checkpoint(tmp_path: Path) -> None:
    source = create_model("focal_tiny")
    path = tmp_path / "focal_tiny.pth"
    torch.save({"model": source.state_dict()}, path)
    loaded = create_model("focal_tiny_patch4_window7_224", checkpoint=path)
    assert not loaded.training
    assert torch.equal(loaded.head.weight, source.head.weight)
    with pytest.raises(CheckpointError, match="another variant"):
        create_model("focal_small", checkpoint=path)


def test_a_failing_load_warns_nothing_and_changes_nothing() -> None:
    model = _micro_224(num_classes=3, embed_dim=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError):
            load_checkpoint(model, load_official_case("micro_224").checkpoint)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
