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

import contextlib
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
from prometheus_client.multiprocess import mark_process_dead
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
        configure_logging(self.log_level_name)
        if multiprocessing.parent_process() is not None:
            absorb_reraised_stop_signals()


def absorb_reraised_stop_signals() -> None:
    """uvicorn re-raises the signal that stopped it once it has shut down gracefully; with these no-op
    handlers in place (uvicorn restores them after serving) that re-raise returns, and the process exits
    0, which is what process supervisors expect."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


class _Stop:
    """SIGTERM/SIGINT: the time is noted at once (the drain budget starts there); the rest happens on a
    thread, since a signal handler must not take the lock that `threading.Event.set` takes (the
    supervisor's loop may hold it when the signal lands): the supervisor is told to stop and this
    process's copy of the listening socket is closed, so that new connections are refused as soon as
    the front ends close theirs, instead of waiting in a backlog nobody accepts from."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.supervisor: _Supervisor | None = None
        self.listener: socket.socket | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handler)

    def handler(self, sig: int, frame: Any) -> None:
        if self.at is None:
            self.at = time.monotonic()
            threading.Thread(target=self._act, args=(signal.Signals(sig).name,), name="stop", daemon=True).start()

    def _act(self, name: str) -> None:
        log.info("received %s: stopping the front ends, then the model host", name)
        if self.supervisor is not None:
            self.supervisor.should_exit.set()
        if self.listener is not None:
            self.listener.close()


class _Supervisor(Multiprocess):
    """uvicorn's worker supervisor, with this service's stop (`_Stop`), a bounded wait for the front
    ends, and the metrics of a replaced front end marked dead (its live gauges stop counting)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], stop: _Stop, join_s: float) -> None:
        super().__init__(config, sockets)  # installs uvicorn's own handlers: ours replace them
        self.join_s = join_s
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop.handler)
        stop.supervisor, stop.listener = self, sockets[0]

    def keep_subprocess_alive(self) -> None:
        self._replacing(super().keep_subprocess_alive)

    def restart_all(self) -> None:  # SIGHUP
        self._replacing(super().restart_all)

    def _replacing(self, step: Any) -> None:
        before = {p.pid for p in self.processes}
        step()
        for pid in before - {p.pid for p in self.processes}:
            mark_dead(pid)

    def join_all(self) -> None:
        end = time.monotonic() + self.join_s
        for process in self.processes:
            process.process.join(max(0.0, end - time.monotonic()))
            if process.process.is_alive():
                log.error("front end %s did not stop in time: killing it", process.pid)
                process.kill()
                process.join()


def mark_dead(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(OSError):
            mark_process_dead(pid)


def serve_with_workers(settings: Settings, workers: int) -> int:
    """Run the model host and `workers` front ends until SIGTERM/SIGINT; the exit code (module docstring).
    `ModelLoadError` (before anything starts) when a model folder or a port cannot be served."""
    stop = _Stop()
    check_model_folders(settings.models)  # fail at once, in this process, on a folder that cannot be served
    if settings.grpc_port:
        _check_port_free(settings.host, settings.grpc_port)
    drain_s = settings.drain_timeout_s
    with tempfile.TemporaryDirectory(prefix="focal-serve-") as run_dir:
        metrics_dir = Path(run_dir) / "metrics"
        metrics_dir.mkdir()
        os.environ[MULTIPROCESS_DIR] = str(metrics_dir)  # read by every process started from here on
        socket_path = str(Path(run_dir) / "model-host.sock")
        config = _FrontEndConfig(
            functools.partial(front_end_app, settings, socket_path),
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=max(1, math.ceil(drain_s)),
            log_level_name=settings.log_level,
        )
        try:
            listener = config.bind_socket()  # before anything starts: a taken port fails here
        except SystemExit:
            raise ModelLoadError(f"cannot listen on {settings.host}:{settings.port}") from None
        spawn = multiprocessing.get_context("spawn")
        control, host_end = spawn.Pipe()
        host = spawn.Process(target=model_host.run, args=(settings, socket_path, host_end), name="focal-model-host")
        host.start()
        host_end.close()
        log.info("started the model host", extra={"fields": {"pid": host.pid, "workers": workers}})
        supervisor = _Supervisor(config, [listener], stop, join_s=drain_s + HOST_CLOSE_GRACE_S)
        host_died = threading.Event()
        codes: dict[str, int | None] = {}
        try:

            def watch_host() -> None:
                multiprocessing.connection.wait([host.sentinel])  # not join(): only the main thread reaps it
                if not supervisor.should_exit.is_set():
                    log.error("the model host exited with %s: stopping the server", host.exitcode)
                    host_died.set()
                    supervisor.should_exit.set()

            threading.Thread(target=watch_host, name="watch-model-host", daemon=True).start()
            if stop.at is None:
                supervisor.run()  # until SIGTERM/SIGINT (or the host died); then the front ends stop and are joined
            codes = {f"front end {p.pid}": p.exitcode for p in supervisor.processes}
        finally:
            stop.listener = None
            listener.close()
            for process in supervisor.processes:
                mark_dead(process.pid)
            if host.is_alive():
                remaining = max(0.0, drain_s - (time.monotonic() - (stop.at or time.monotonic())))
                with contextlib.suppress(OSError):
                    control.send(remaining)
                host.join(remaining + HOST_CLOSE_GRACE_S)
                if host.is_alive():
                    log.error("the model host did not stop in time: killing it")
                    host.kill()
                    host.join()
        codes[f"model host {host.pid}"] = host.exitcode
        for who, code in codes.items():
            (log.info if code == 0 else log.error)("%s exited with %s", who, code)
        return 0 if not host_died.is_set() and all(code == 0 for code in codes.values()) else 1


def _check_port_free(host: str, port: int) -> None:
    """The front ends share the gRPC port (SO_REUSEPORT), which would not notice another program on it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # as gRPC binds: a previous run's connections in TIME_WAIT do not count, a listener does
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ModelLoadError(f"gRPC cannot listen on {host}:{port}: {exc.strerror}") from None
