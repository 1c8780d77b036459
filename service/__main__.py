"""`python -m service --model [NAME=]DIR [--model [NAME=]DIR2] [--host H] [--port P]`; every setting also
as FOCAL_* (the Open Inference Protocol's gRPC port: FOCAL_GRPC_PORT, default 8001)."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.logs import configure_logging
from service.models import ModelLoadError
from service.settings import Settings

log = logging.getLogger("focal.service")


class _Server(uvicorn.Server):
    """On SIGTERM/SIGINT: readiness turns false at once, then uvicorn's graceful shutdown runs."""

    def __init__(self, config: uvicorn.Config, on_exit: Any) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


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
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in {"models": args.model, "host": args.host, "port": args.port, "backend": args.backend}.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
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
    # uvicorn re-raises the signal that stopped it once it has shut down; with
    # these no-op handlers in place that re-raise returns, and a graceful
    # shutdown exits 0 (what process supervisors expect).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    _Server(config, app.state.service.begin_draining).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
