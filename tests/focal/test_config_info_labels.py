from __future__ import annotations

import json

import pytest

from focal import VARIANTS, get_variant, imagenet1k_labels
from focal.__main__ import main
from focal.info import describe


def test_official_long_names_are_aliases() -> None:
    assert get_variant("focal_small_useconv_patch4_window7_224").name == "focal_small_useconv"
    assert get_variant("Focal-Tiny").name == "focal_tiny"
    with pytest.raises(KeyError, match="known: focal_tiny"):
        get_variant("focal_huge")


def test_variants_use_the_official_hyper_parameters() -> None:
    base = get_variant("focal_base").config()
    assert (base.embed_dim, base.depths, base.num_heads) == (128, (2, 2, 18, 2), (4, 8, 16, 32))
    assert base.focal_levels == (2, 2, 2, 2)
    assert base.focal_windows == (7, 5, 3, 1)
    assert get_variant("focal_tiny_useconv").config().use_conv_embed
    assert all(v.checkpoint_url.endswith("-is224-ws7.pth") for v in VARIANTS.values())


@pytest.mark.parametrize(
    ("variant", "gmacs"),
    [
        ("focal_tiny", 4.92),
        ("focal_small", 9.43),
        ("focal_base", 16.37),
        ("focal_tiny_useconv", 5.17),  # the official README rounds these three to 5.2, 9.7 and 16.8 G
        ("focal_small_useconv", 9.68),
        ("focal_base_useconv", 16.80),
    ],
)
def test_macs_match_the_official_numbers(variant: str, gmacs: float) -> None:
    assert round(describe(get_variant(variant).config()).macs / 1e9, 2) == gmacs


def test_info_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "focal_tiny", "--image-size", "256x320", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image_size"] == [256, 320]
    assert out["stages"][3]["resolution"] == [8, 10]
    assert main(["info", "focal_nano"]) == 2
    assert "unknown variant" in capsys.readouterr().err


def test_labels() -> None:
    labels = imagenet1k_labels()
    assert len(labels) == 1000
    assert (labels[0], labels[207], labels[999]) == ("tench", "golden retriever", "toilet tissue")
