"""`FOCAL_WORKERS` > 1: several HTTP front-end processes on one port, one model host behind them.

    python -m service (supervisor: this module)
     |- model host (service.model_host): the backends, one batcher per model
     |- front end 1 ... N (uvicorn workers, service.app with service.remote models): HTTP, gRPC,
        decoding and preprocessing, each on its own interpreter lock

The front ends are uvicorn's own worker processes (`uvicorn.supervisors.Multiprocess`: one
listening socket shared by all of them, a dead worker replaced, SIGHUP restarts them one by one).
The Open Inference Protocol's gRPC port is shared the same way (SO_REUSEPORT; checked free first).
Metrics: prometheus-client's multiprocess mode, in a folder made for this run (`service.metrics`).

Shutdown (SIGTERM or SIGINT to this process): uvicorn's supervisor sends SIGTERM to each front
end, which stops accepting, answers every request it holds (their samples are in the host's
queue; the host keeps running) and exits 0. Then the host is told to stop: it finishes whatever
is left within the rest of the drain budget, closes the backends and exits 0. This process exits
0 when every process did, and 1 otherwise (each exit code is logged). A model host that dies
stops the whole server (exit 1): the front ends cannot serve without it, and the orchestrator
restarts the pod.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.supervisors.multiprocess import Multiprocess

from service import model_host
from service.app import create_app
from service.logs import configure_logging
from service.metrics import MULTIPROCESS_DIR
from service.models import ModelLoadError, check_model_folders
from service.settings import Settings

log = logging.getLogger("focal.service")
HOST_CLOSE_GRACE_S = 15.0  # after the drain budget: closing backends (a TensorRT context, a CUDA stream)


def front_end_app(settings: Settings, model_host_socket: str) -> FastAPI:
    """The app of one front-end process (uvicorn calls it in the worker: a factory)."""
    return create_app(settings, model_host_socket=model_host_socket)


class _FrontEndConfig(uvicorn.Config):
    """uvicorn's config, plus what each front-end process needs before it serves: this service's JSON
    logging, and SIGTERM/SIGINT handlers that let uvicorn's graceful shutdown end in exit 0 (uvicorn
    re-raises the signal it stopped on once it has shut down, which by default would kill the worker)."""

    def __init__(self, *args: Any, log_level_name: str, **kwargs: Any) -> None:
        self.log_level_name = log_level_name
        super().__init__(*args, **kwargs)

    def configure_logging(self) -> None:  # uvicorn calls this in every worker before it serves
        super().configure_logging()
        configure_logging(getattr(self, "log_level_name", "info"))
        if multiprocessing.parent_process() is not None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: None)


class _Supervisor(Multiprocess):
    """uvicorn's worker supervisor, stopping the moment SIGTERM or SIGINT arrives (uvicorn's own handlers
    only queue a signal for its 0.5 s loop, which would leave the front ends serving new requests
    meanwhile), and noting when: the drain budget starts there."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self.stop_requested: float | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)

    def _stop(self, sig: int, frame: Any) -> None:
        if self.stop_requested is None:
            self.stop_requested = time.monotonic()
            log.info("received %s: stopping the front ends, then the model host", signal.Signals(sig).name)
        self.should_exit.set()


def serve_with_workers(settings: Settings, workers: int) -> int:
    """Run the model host and `workers` front ends until SIGTERM/SIGINT; the exit code (module docstring).
    `ModelLoadError` (before anything starts) when a model folder cannot be served."""
    check_model_folders(settings.models)  # fail at once, in this process, on a folder that cannot be served
    if settings.grpc_port:
        _check_port_free(settings.host, settings.grpc_port)
    with tempfile.TemporaryDirectory(prefix="focal-serve-") as run_dir:
        metrics_dir = Path(run_dir) / "metrics"
        metrics_dir.mkdir()
        os.environ[MULTIPROCESS_DIR] = str(metrics_dir)  # read by every process started from here on
        socket_path = str(Path(run_dir) / "model-host.sock")
        spawn = multiprocessing.get_context("spawn")
        control, host_end = spawn.Pipe()
        host = spawn.Process(
            target=model_host.run, args=(settings, socket_path, host_end), name="focal-model-host", daemon=False
        )
        host.start()
        host_end.close()
        log.info("started the model host", extra={"fields": {"pid": host.pid, "workers": workers}})

        config = _FrontEndConfig(
            functools.partial(front_end_app, settings, socket_path),
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=max(1, math.ceil(settings.drain_timeout_s)),
            log_level_name=settings.log_level,
        )
        listener = config.bind_socket()
        supervisor = _Supervisor(config, sockets=[listener])
        host_died = threading.Event()

        def watch_host() -> None:
            multiprocessing.connection.wait([host.sentinel])  # not join(): only the main thread reaps it
            if not supervisor.should_exit.is_set():
                log.error("the model host exited with %s: stopping the server", host.exitcode)
                host_died.set()
                supervisor.should_exit.set()

        threading.Thread(target=watch_host, name="watch-model-host", daemon=True).start()
        supervisor.run()  # until SIGTERM/SIGINT (or the host died); then the front ends are stopped and joined
        listener.close()
        codes = {f"front end {p.pid}": p.exitcode for p in supervisor.processes}

        if host.is_alive():
            began = supervisor.stop_requested or time.monotonic()
            remaining = max(0.0, settings.drain_timeout_s - (time.monotonic() - began))
            control.send(remaining)
            host.join(remaining + HOST_CLOSE_GRACE_S)
            if host.is_alive():
                log.error("the model host did not stop in time: killing it")
                host.kill()
                host.join()
        codes[f"model host {host.pid}"] = host.exitcode
        for process, code in codes.items():
            (log.info if code == 0 else log.error)("%s exited with %s", process, code)
        return 0 if not host_died.is_set() and all(code == 0 for code in codes.values()) else 1


def _check_port_free(host: str, port: int) -> None:
    """The front ends share the gRPC port (SO_REUSEPORT), which would not notice another program on it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ModelLoadError(f"gRPC cannot listen on {host}:{port}: {exc.strerror}") from None
