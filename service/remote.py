"""A front-end process's view of the models in the model host (`FOCAL_WORKERS` > 1).

Each HTTP front end decodes and preprocesses its own requests, then sends every sample to the
model host (`service.model_host`), whose one batcher per model forms batches from all front ends'
samples. Here:

- `HostLink`: this process's one connection to the host (`service.ipc` messages), with any number
  of requests in flight, matched to their answers by id;
- `RemoteBatcher`: `submit(sample, timeout_s)` through the link, raising the batcher's own
  exceptions (`QueueFull`, `Draining`, `DeadlineExceeded`, `BackendError`), so the request path
  (`service.inference`) maps them to the same answers as in one process; the sample of a caller
  that goes away is cancelled in the host, and its batcher drops it before it runs;
- `RemoteModel`: a `service.models.Model` whose health and info follow the host's;
- `follow_model_host`: polls the host every `STATUS_INTERVAL_S`, so readiness, liveness,
  `/v1/models` and admission here say what the host says. A host that stops answering makes this
  process not live; a lost connection is re-made (the requests it held fail), and a host that
  cannot be reached makes this process failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from service import errors
from service.batcher import BackendError, DeadlineExceeded, Draining, QueueFull
from service.health import ModelHealth
from service.ipc import ProtocolError, array_of, read_message, write_message
from service.models import Model, ModelFolder, health_policy
from service.state import ServiceState

log = logging.getLogger("focal.service")

STATUS_INTERVAL_S = 0.25
CONNECT_TIMEOUT_S = 120.0  # the host creates its socket once its imports are done (seconds)
RECONNECT_TIMEOUT_S = 10.0
STALE_AFTER_S = 10.0  # no status answer for this long: the host is stuck (not live)
# The host answers a sample's deadline itself; this much later the front end stops waiting anyway.
DEADLINE_GRACE_S = 2.0
ERRORS: dict[str, type[Exception]] = {e.__name__: e for e in (QueueFull, Draining, DeadlineExceeded, BackendError)}


class HostGone(ConnectionError):
    """The connection to the model host is closed."""


class HostLink:
    def __init__(self, path: str, on_close: Callable[[str], None] | None = None) -> None:
        """`on_close(reason)`: called once if the link closes other than by `close()`."""
        self.path, self.on_close = path, on_close
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[tuple[dict[str, Any], bytes]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self.gone: str | None = None  # why the link closed (None: open, or not yet connected)
        self.last_status = time.monotonic()

    @property
    def alive(self) -> bool:
        return self._writer is not None and self.gone is None

    async def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect (again, after a lost connection: the requests it held have failed)."""
        self.gone, self._writer = None, None
        end = time.monotonic() + timeout_s
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > end:
                    raise HostGone(f"no model host at {self.path} after {timeout_s:g} s") from None
                await asyncio.sleep(0.05)
        self._writer = writer
        write_message(writer, {"op": "hello", "pid": os.getpid()})
        self._reading = asyncio.get_running_loop().create_task(self._read(reader), name="model-host-replies")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                header, payload = await read_message(reader)
                waiter = self._waiting.pop(int(header["id"]), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result((header, payload))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._close(f"the model host closed the connection ({type(exc).__name__})")
        except (ProtocolError, KeyError, ValueError) as exc:
            self._close(f"the model host sent a broken message ({exc})")

    def _close(self, reason: str, expected: bool = False) -> None:
        if self.gone is None:
            self.gone = reason
            if not expected:
                log.error("%s", reason)
                if self.on_close is not None:
                    self.on_close(reason)
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(HostGone(reason))
        self._waiting.clear()
        if self._writer is not None:
            self._writer.close()

    def start(
        self, header: dict[str, Any], array: np.ndarray | None = None
    ) -> tuple[int, asyncio.Future[tuple[dict[str, Any], bytes]]]:
        """Send a request; its id and the future of its answer (header, payload)."""
        if self._writer is None or self.gone is not None:
            raise HostGone(self.gone or "not connected to the model host")
        request_id = next(self._ids)
        answer: asyncio.Future[tuple[dict[str, Any], bytes]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        write_message(self._writer, {**header, "id": request_id}, array)
        return request_id, answer

    async def drain(self) -> None:
        """Wait while the socket's buffer is full (a host that stopped reading holds its senders here)."""
        if self._writer is not None and self.gone is None:
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()

    def cancel(self, request_id: int) -> None:
        """The caller went away: the host takes the sample out of its queue (no answer comes)."""
        self._waiting.pop(request_id, None)
        if self._writer is not None and self.gone is None:
            write_message(self._writer, {"op": "cancel", "id": request_id})

    async def status(self, timeout_s: float) -> dict[str, Any]:
        request_id, answer = self.start({"op": "status"})
        try:
            header, _ = await asyncio.wait_for(answer, timeout_s)
        finally:
            self._waiting.pop(request_id, None)
        self.last_status = time.monotonic()
        status: dict[str, Any] = header["status"]
        return status

    async def close(self) -> None:
        self._close("closed by this front end", expected=True)
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading


class RemoteBatcher:
    """The host's batcher of one model, seen from a front end."""

    def __init__(self, link: HostLink, model: str, info: dict[str, Any]) -> None:
        self.link, self.model = link, model
        self.max_batch_size: int = info["max_batch_size"]
        self.max_queue_delay_s: float = info["max_queue_delay_ms"] / 1000
        self.host_alive, self.host_busy_for, self.host_queue_depth = True, 0.0, 0
        self.pending = 0  # samples of this process in the host's hands

    @property
    def alive(self) -> bool:
        return self.link.alive and self.host_alive

    @property
    def queue_depth(self) -> int:
        return self.host_queue_depth

    def busy_for(self) -> float:
        return self.host_busy_for

    async def submit(self, sample: np.ndarray, timeout_s: float) -> np.ndarray:
        try:
            request_id, answer = self.link.start({"op": "infer", "model": self.model, "timeout": timeout_s}, sample)
        except HostGone as exc:
            raise Draining(str(exc)) from None
        self.pending += 1
        try:
            await self.link.drain()
            header, payload = await asyncio.wait_for(answer, timeout_s + DEADLINE_GRACE_S)
        except asyncio.TimeoutError:
            self.link.cancel(request_id)
            raise DeadlineExceeded(f"no result within the request timeout of {timeout_s:g} s") from None
        except asyncio.CancelledError:
            self.link.cancel(request_id)
            raise
        except HostGone as exc:
            raise BackendError(str(exc)) from None
        finally:
            self.pending -= 1
        error = header.get("error")
        if error == "ServiceError":  # raised by the host's model lookup: answered as it would be there
            failure = errors.ServiceError(header["message"], headers=header.get("headers"))
            failure.status, failure.code = int(header["status"]), str(header["code"])
            raise failure
        if error is not None:
            raise ERRORS.get(error, BackendError)(header.get("message", error))
        return array_of(header, payload)


class RemoteModel(Model):
    """A model served by the model host; its health, info and queue depth follow the host's."""

    batcher: RemoteBatcher
    _info: dict[str, Any]

    def __init__(self, checked: ModelFolder, link: HostLink, status: dict[str, Any], health: ModelHealth) -> None:
        super().__init__(checked, health, RemoteBatcher(link, checked.name, status["info"]))
        self.update(status)

    def update(self, status: dict[str, Any]) -> None:
        self._info = status["info"]
        self.health.follow(status["health"])
        self.warmup_seconds = status["warmup_seconds"]
        self.batcher.host_alive = status["batch_worker_alive"]
        self.batcher.host_busy_for = status["busy_for"]
        self.batcher.host_queue_depth = status["queue_depth"]

    def info(self) -> dict[str, Any]:
        return self._info

    async def close(self, drain_timeout_s: float) -> None:
        """Wait (up to the timeout) for this process's samples in the host's hands."""
        end = time.monotonic() + drain_timeout_s
        while self.batcher.pending and time.monotonic() < end:
            await asyncio.sleep(0.01)


async def follow_model_host(state: ServiceState, link: HostLink) -> None:
    """Connect to the model host, then keep this process's models and start-up state equal to the
    host's. Cancelling it leaves the link open: requests in flight finish first (`HostLink.close`)."""
    connected = await _connect_or_fail(state, link, CONNECT_TIMEOUT_S)
    while connected:
        try:
            status = await link.status(timeout_s=STALE_AFTER_S)
        except asyncio.TimeoutError:
            _host_stuck(state, time.monotonic() - link.last_status)
            continue
        except HostGone:  # the connection broke: the host may still be there (if not, the supervisor stops)
            log.warning("reconnecting to the model host")
            connected = await _connect_or_fail(state, link, RECONNECT_TIMEOUT_S)
            continue
        _adopt(state, link, status)
        await asyncio.sleep(STATUS_INTERVAL_S)


async def _connect_or_fail(state: ServiceState, link: HostLink, timeout_s: float) -> bool:
    try:
        await link.connect(timeout_s)
    except HostGone as exc:
        host_gone(state, str(exc))
        return False
    return True


def host_gone(state: ServiceState, reason: str) -> None:
    """Without its host a front end cannot serve: failed (not ready, not live)."""
    state.failed = f"the model host process is gone: {reason}"


def _adopt(state: ServiceState, link: HostLink, status: dict[str, Any]) -> None:
    state.failed = status["failed"]
    for name, model_status in status["models"].items():
        model = state.models.get(name)
        if isinstance(model, RemoteModel):
            model.update(model_status)
            continue
        planned = state.repository.get(name)
        if planned is None:
            log.error("the model host serves %s, which this front end does not know", name)
            continue
        state.models[name] = RemoteModel(planned, link, model_status, ModelHealth(health_policy(state.settings)))
    for name in [n for n in state.models if n not in status["models"]]:
        del state.models[name]
    state.loading = status["loading"]


def _host_stuck(state: ServiceState, seconds: float) -> None:
    """No status for a while: every model's batch worker counts as stopped (readiness and liveness false)."""
    log.error("the model host has not answered for %.0f s", seconds)
    for model in state.models.values():
        if isinstance(model, RemoteModel):
            model.batcher.host_alive = False
