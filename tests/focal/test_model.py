from __future__ import annotations

import pytest
import torch

from focal import VARIANTS, CheckpointAdaptationWarning, FocalTransformer, create_model, load_checkpoint
from tests.support import load_official_case

# Official parameter counts, in millions (README of microsoft/Focal-Transformer).
EXPECTED_PARAMS_M = {
    "focal_tiny": 28.88,
    "focal_small": 51.14,
    "focal_base": 89.82,
    "focal_tiny_useconv": 30.83,
    "focal_small_useconv": 53.09,
    "focal_base_useconv": 93.27,
    "focal_fast_tiny": 30.22,  # the official README: 30.2M, 51.5M, 91.2M
    "focal_fast_small": 51.53,
    "focal_fast_base": 91.19,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_count(variant: str) -> None:
    model = create_model(variant)
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 2) == EXPECTED_PARAMS_M[variant]


def _micro(**overrides: object) -> FocalTransformer:
    kwargs = {**load_official_case("micro_256x320").kwargs, **overrides}
    return FocalTransformer(**kwargs).eval()


def test_batch_elements_are_independent() -> None:
    """Logits of image i are the same alone and inside a batch of 5."""
    torch.manual_seed(0)
    model = _micro()
    images = torch.randn(5, 3, 256, 320)
    with torch.inference_mode():
        batched = model(images)
        alone = torch.cat([model(images[i : i + 1]) for i in range(5)])
    assert (batched - alone).abs().max().item() < 1e-5


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_trace_is_correct_at_other_batch_sizes() -> None:
    """A trace at batch 2 must give eager results at batch 1 and 3 (no batch size baked in)."""
    case = load_official_case("micro_256x320")
    model = FocalTransformer(**case.kwargs).eval()
    load_checkpoint(model, case.checkpoint)
    with torch.inference_mode():
        traced = torch.jit.trace(model, torch.randn(2, 3, 256, 320), check_trace=False)
        for batch in (1, 3):
            images = torch.cat([case.images, case.images])[:batch]
            assert (traced(images) - model(images)).abs().max().item() < 1e-5
    graph = str(traced.inlined_graph)
    for op in ("aten::roll", "aten::im2col", "aten::col2im", "aten::nonzero", "aten::index_put", "aten::copy_"):
        assert op not in graph, f"{op} in the forward pass"


def test_features_only_gives_four_normed_maps() -> None:
    model = _micro(features_only=True, img_size=(256, 320))
    assert not hasattr(model, "head")
    with torch.inference_mode():
        maps = model(torch.randn(2, 3, 256, 320))
    assert [tuple(m.shape) for m in maps] == [
        (2, 8, 64, 80),
        (2, 16, 32, 40),
        (2, 32, 16, 20),
        (2, 64, 8, 10),
    ]
    keys = model.state_dict().keys()
    assert {f"norm{i}.weight" for i in range(4)} <= keys
    assert "norm.weight" not in keys


def test_features_match_the_classifier_trunk() -> None:
    """The feature maps are the classifier's stage outputs (same weights), only normed per stage."""
    case = load_official_case("micro_224")
    classifier = FocalTransformer(**case.kwargs).eval()
    load_checkpoint(classifier, case.checkpoint)
    backbone = FocalTransformer(**case.kwargs, features_only=True).eval()
    with pytest.warns(CheckpointAdaptationWarning) as record:
        load_checkpoint(backbone, case.checkpoint)
    notes = [str(w.message) for w in record]
    assert len(notes) == 2
    assert "head.bias, head.weight, norm.bias, norm.weight: dropped" in notes[0]
    assert "norm0.bias, norm0.weight, norm1.bias" in notes[1]
    with torch.inference_mode():
        last = classifier.forward_stages(case.images)[-1]
        maps = backbone(case.images)
        expected = backbone.norm3(last).transpose(1, 2).reshape(maps[-1].shape)
    assert torch.allclose(maps[-1], expected, atol=1e-6)


def test_wrong_input_size_is_refused() -> None:
    model = _micro()
    with pytest.raises(ValueError, match="built for 256x320"):
        model(torch.randn(1, 3, 224, 224))


@pytest.mark.parametrize("size", [(227, 227), (200, 200)])
def test_sizes_the_official_convs_cannot_produce_are_refused(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        _micro(img_size=size, use_conv_embed=True)


def test_unknown_constructor_keyword_is_refused() -> None:
    with pytest.raises(TypeError, match="focal_levle"):
        FocalTransformer(focal_levle=[2, 2, 2, 2])


def test_training_only_keywords_are_accepted_and_ignored() -> None:
    model = FocalTransformer(
        drop_path_rate=0.2, use_checkpoint=True, depths=[1, 1, 1, 1], embed_dim=8, num_heads=[1, 1, 1, 1]
    )
    assert model.config.ignored_training_kwargs == ("drop_path_rate", "use_checkpoint")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"use_shift": True}, "use_shift"),
        ({"focal_pool": "conv"}, "focal_pool"),
        ({"focal_levels": [3, 3, 3, 3]}, "focal_level 3"),
    ],
)
def test_unsupported_official_options_say_so(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(NotImplementedError, match=match):
        FocalTransformer(**kwargs)
