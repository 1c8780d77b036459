"""`python -m focal`: list the variants, or describe one (parameters, MACs, stage geometry)."""

from __future__ import annotations

import argparse
import json
import sys

from focal.config import VARIANTS, get_variant
from focal.info import describe


def parse_image_size(text: str) -> tuple[int, int]:
    """'224' -> (224, 224); '256x320' -> (256, 320)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}") from None
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}")
    return sizes[0], sizes[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m focal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("variants", help="list the variant names")
    info = sub.add_parser("info", help="parameters, MACs and stage geometry of a variant")
    info.add_argument("variant")
    info.add_argument("--image-size", type=parse_image_size, default=(224, 224), metavar="N|HxW")
    info.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)

    if args.command == "variants":
        for v in VARIANTS.values():
            print(f"{v.name:22s} {v.official_name}")
        return 0
    try:
        variant = get_variant(args.variant)
        result = describe(variant.config(img_size=args.image_size))
    except (KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    if args.json:
        family = variant.config().family
        print(
            json.dumps(
                {"variant": variant.name, "family": family, "image_size": list(args.image_size), **result.as_dict()}
            )
        )
        return 0
    h, w = args.image_size
    print(f"{variant.name} ({variant.official_name}) at {h}x{w}")
    print(f"  parameters: {result.params / 1e6:.2f} M")
    print(f"  MACs:       {result.macs / 1e9:.2f} G (official flops() convention)")
    for s in result.stages:
        print(
            f"  stage {s['stage']}: {s['resolution'][0]}x{s['resolution'][1]}x{s['dim']}, {s['blocks']} blocks, "
            f"window {s['window']} ({s['windows'][0]}x{s['windows'][1]} windows), "
            f"keys per query {s['keys_per_query']}"
            + (
                ""
                if variant.config().family == "focal_fast"
                else f", neighbour ring {'yes' if s['neighbor_ring'] else 'no'}"
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
