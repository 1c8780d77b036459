"""The model host: with `FOCAL_WORKERS` > 1, the one process that runs the models.

It loads and warms up every model as one process does (`service.repository.load_planned_models`:
the same backends, one `DynamicBatcher` per model, health, recovery probes, metrics), and serves
the front-end processes over a Unix socket (`service.ipc`):

- `infer`: one preprocessed sample for a model; the answer is its output row, or the error that
  the batcher raised (queue full, draining, deadline, backend failure) or that the model lookup
  raised (not loaded, not serving); samples from every front end meet in the same queue, so
  batches fill from all of their traffic;
- `cancel`: that front end's caller went away; the sample leaves the queue;
- `status`: start-up state, and per model its info, health, queue depth and batch worker.

It ignores SIGINT and SIGTERM: `service.workers` tells it to stop (over `control`) once every
front end has exited, so nothing a front end still waits for is dropped; it then drains its
queues within what is left of the drain budget, closes the backends and exits 0. If that
supervisor goes away (its end of `control` closes), the host stops the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, cast

from service import errors
from service.batcher import BackendError, DeadlineExceeded, Draining, QueueFull
from service.ipc import ProtocolError, array_of, read_message, write_message
from service.logs import configure_logging
from service.metrics import Metrics
from service.models import ServedModel, check_model_folders
from service.repository import close_models, load_planned_models
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("focal.service")


def run(settings: Settings, socket_path: str, control: Connection) -> None:
    """The process's entry point (a `multiprocessing` target)."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a terminal's Ctrl-C reaches the whole process group
        signal.signal(sig, signal.SIG_IGN)
    configure_logging(settings.log_level)
    code = asyncio.run(_serve(settings, socket_path, control))
    # Not sys.exit: the interpreter would join every executor thread, so a stuck backend call (or a
    # model still loading, a TensorRT build, when the stop came) would hold the exit past its budget.
    logging.shutdown()
    os._exit(code)


async def _serve(settings: Settings, socket_path: str, control: Connection) -> int:
    state = ServiceState(
        settings=settings,
        metrics=Metrics(),
        preprocess_pool=ThreadPoolExecutor(1, thread_name_prefix="unused"),  # front ends preprocess
        planned=check_model_folders(settings.models),
    )
    async with hosting(state, socket_path):
        state.begin_draining(await _stop_requested(control, settings.drain_timeout_s))
    log.info("model host stopped")
    return 0


@contextlib.asynccontextmanager
async def hosting(state: ServiceState, socket_path: str) -> AsyncIterator[ModelHost]:
    """Serve front ends on `socket_path` and load the models; on exit, drain and close them."""
    host = ModelHost(state)
    server = host.server = await asyncio.start_unix_server(host.connection, path=socket_path)
    os.chmod(socket_path, 0o600)
    log.info("model host listening for front ends", extra={"fields": {"pid": os.getpid()}})
    loader = asyncio.create_task(load_planned_models(state), name="load-models")
    try:
        yield host
    finally:
        state.begin_draining()
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader
        await close_models(state)
        server.close()
        await host.close()


async def _stop_requested(control: Connection, default_drain_s: float) -> float:
    """Wait for the supervisor's stop message (the seconds left to drain), or for it to go away."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(control.fileno(), ready.set)
    try:
        await ready.wait()
    finally:
        loop.remove_reader(control.fileno())
    try:
        return float(control.recv())
    except (EOFError, OSError, ValueError, TypeError):
        log.warning("the supervisor went away: stopping")
        return default_drain_s


def _forget_task(running: dict[int, asyncio.Task[None]], request_id: int, _: asyncio.Task[None]) -> None:
    running.pop(request_id, None)


class ModelHost:
    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self._connections: set[asyncio.StreamWriter] = set()
        self._connection_ids = itertools.count(1)
        self.server: asyncio.Server | None = None

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One front-end process; its requests run side by side (answered in any order)."""
        self._connections.add(writer)
        running: dict[int, asyncio.Task[None]] = {}
        source = f"front end {next(self._connection_ids)}"  # what a batch counts its sources by
        try:
            while True:
                header, payload = await read_message(reader)
                op, request_id = header.get("op"), header.get("id")
                if op == "infer" and isinstance(request_id, int):
                    task = asyncio.create_task(self._infer(header, payload, writer, source))
                    running[request_id] = task
                    task.add_done_callback(functools.partial(_forget_task, running, request_id))
                elif op == "cancel":  # the answer may already be on its way: then there is nothing to cancel
                    cancelled = running.get(request_id) if isinstance(request_id, int) else None
                    if cancelled is not None:
                        cancelled.cancel()
                elif op == "status":
                    write_message(writer, {"id": request_id, "status": self.status()})
                elif op == "hello":
                    log.info("%s connected", source, extra={"fields": {"pid": header.get("pid")}})
                else:
                    raise ProtocolError(f"unknown request {op!r}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the front end closed its end: what it still had queued leaves the queue
        except (ProtocolError, ValueError) as exc:
            log.error("%s sent a broken message (%s): closing its connection", source, exc)
        finally:
            for task in running.values():
                task.cancel()
            self._connections.discard(writer)
            writer.close()

    async def _infer(self, header: dict[str, Any], payload: bytes, writer: asyncio.StreamWriter, source: str) -> None:
        answer: dict[str, Any] = {"id": header["id"]}
        try:
            sample = array_of(header, payload)
            with self.state.model_named(str(header["model"])).lease() as leased:
                model = cast(ServedModel, leased)  # the host's models run here
                spec = model.manifest.input
                if tuple(sample.shape) not in model.input_shapes or sample.dtype.name != spec.dtype:
                    raise errors.BadRequest(f"a {sample.dtype} {list(sample.shape)} sample; {model.name} takes "
                                            f"{spec.dtype} {' or '.join(map(str, model.input_shapes))}")  # fmt: skip
                row = await model.batcher.submit(sample, float(header["timeout"]), source)
        except (QueueFull, Draining, DeadlineExceeded, BackendError) as exc:
            write_message(writer, {**answer, "error": type(exc).__name__, "message": str(exc)})
        except errors.ServiceError as exc:  # the same error as in one process (a front end renders it)
            answer |= {"error": "ServiceError", "status": exc.status, "code": exc.code, "message": exc.message,
                       "headers": exc.headers}  # fmt: skip
            write_message(writer, answer)
        except (ProtocolError, KeyError, ValueError, TypeError) as exc:
            write_message(writer, {**answer, "error": "BackendError", "message": f"a broken request ({exc})"})
        else:
            write_message(writer, answer, row)

    def status(self) -> dict[str, Any]:
        state = self.state
        return {
            "loading": state.loading,
            "failed": state.failed,
            "models": {
                name: {
                    "info": model.info(),
                    "health": model.health.snapshot(),
                    "warmup_seconds": model.warmup_seconds,
                    "batch_worker_alive": model.batcher.alive,
                    "busy_for": model.batcher.busy_for(),
                    "queue_depth": model.batcher.queue_depth,
                }
                for name, model in state.models.items()
            },
        }

    async def close(self) -> None:
        for writer in list(self._connections):
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
