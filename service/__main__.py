"""`python -m service --model [NAME=]DIR [--model [NAME=]DIR2] [--host H] [--port P] [--workers N]`; every
setting also as FOCAL_* (the Open Inference Protocol's gRPC port: FOCAL_GRPC_PORT, default 8001).

One process when FOCAL_WORKERS is 1; otherwise N front-end processes and a model host (`service.workers`)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.logs import configure_logging
from service.models import ModelLoadError
from service.settings import Settings
from service.workers import absorb_reraised_stop_signals, serve_with_workers

log = logging.getLogger("focal.service")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument(
        "--model",
        action="append",
        type=Path,
        metavar="[NAME=]DIR",
        help="an export folder, served as NAME (default: its variant; repeatable)",
    )
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"])
    parser.add_argument("--workers", type=int, help="HTTP front-end processes (default: one per core, at most 16)")
    args = parser.parse_args(argv)
    overrides = {{"model": "models"}.get(k, k): v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    workers = settings.worker_count()
    try:
        if workers > 1:
            return serve_with_workers(settings, workers)
        app = create_app(settings)
    except ModelLoadError as exc:
        print(f"cannot serve: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        # uvicorn waits for in-flight requests (and so for their queued images) up to this;
        # the batchers then get whatever is left of the same budget (ServiceState.drain_remaining).
        timeout_graceful_shutdown=max(1, math.ceil(settings.drain_timeout_s)),
    )
    absorb_reraised_stop_signals()
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
