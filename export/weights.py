"""Where the weights come from: a local file, the official release (downloaded once), or random init."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from manifest import RANDOM_INIT, Weights, WeightsKind, sha256_file

RANDOM_INIT_SEED = 0


class WeightsError(Exception):
    """The weights could not be obtained (missing file, no network, bad download)."""


@dataclass(frozen=True)
class WeightsSource:
    kind: WeightsKind
    path: Path | None
    sha256: str | None
    url: str | None = None

    def manifest_entry(self, adaptations: list[str]) -> Weights:
        if self.kind == RANDOM_INIT:
            return Weights(source=RANDOM_INIT, seed=RANDOM_INIT_SEED, sha256=None)
        return Weights(
            source=self.kind,
            sha256=self.sha256,
            file=self.path.name if self.path else None,
            path=str(self.path.resolve()) if self.path else None,  # for the service's PyTorch reference
            url=self.url,
            adaptations=adaptations,
        )

    def fingerprint(self) -> str:
        return f"{RANDOM_INIT}:{RANDOM_INIT_SEED}" if self.kind == RANDOM_INIT else f"sha256:{self.sha256}"


def cache_dir() -> Path:
    """User cache for downloaded checkpoints: $FOCAL_CACHE_DIR, else $XDG_CACHE_HOME/focal-serve."""
    if os.environ.get("FOCAL_CACHE_DIR"):
        return Path(os.environ["FOCAL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "focal-serve"


def local_weights(path: Path) -> WeightsSource:
    if not path.is_file():
        raise WeightsError(f"--weights {path}: no such file")
    return WeightsSource(kind="file", path=path, sha256=sha256_file(path))


def pretrained_weights(url: str, log: Callable[[str], None] = print, timeout_s: float = 30.0) -> WeightsSource:
    """The official checkpoint for `url`, downloaded into the cache unless already there."""
    target = cache_dir() / url.rsplit("/", 1)[-1]
    if target.is_file():
        log(f"using cached checkpoint {target}")
        return WeightsSource(kind="pretrained", path=target, sha256=sha256_file(target), url=url)
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading {url} -> {target}")
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, partial.open("wb") as f:
            _copy_with_progress(response, f, int(response.headers.get("Content-Length") or 0), log)
        partial.replace(target)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise WeightsError(
            f"could not download the official checkpoint ({exc}); offline? Pass a local file with "
            f"--weights PATH (e.g. {target.name}), or --random-init for an untrained model"
        ) from exc
    return WeightsSource(kind="pretrained", path=target, sha256=sha256_file(target), url=url)


def _copy_with_progress(source: BinaryIO, sink: BinaryIO, total: int, log: Callable[[str], None]) -> None:
    done, next_report = 0, 0.1
    while block := source.read(1 << 20):
        sink.write(block)
        done += len(block)
        if total and done / total >= next_report:
            log(f"downloaded {done / 1e6:.0f} of {total / 1e6:.0f} MB")
            next_report += 0.1


def random_init() -> WeightsSource:
    return WeightsSource(kind=RANDOM_INIT, path=None, sha256=None)


def seed_random_init() -> None:
    import torch  # here, not at the top: the service reads manifests without torch

    torch.manual_seed(RANDOM_INIT_SEED)
