"""The model repository: which models a running server serves, changed while it serves (Triton's
model repository extension, over REST and gRPC; `service.v2`).

- `load_model(state, name, folder)`: checks the export folder, builds and warms up the new
  model *beside* the one it replaces, then switches in one step (no `await` between the
  lookup a request makes and its lease, so a request sees either the old model or the new
  one, never neither). The old model then finishes every request that holds it, drains its
  queue and closes (`ServedModel.retire`), in the background: **no request fails because of a
  switch**. A failed load leaves the old model serving.
- `unload_model(state, name)`: new requests get 404 at once; the requests already running
  finish; then the model closes.
- Both run to their end even when the caller goes away, and are refused (503) while the server
  starts up (its loader owns the models then) or shuts down.
- A request still holding a replaced model after `FOCAL_DRAIN_TIMEOUT_S` (a client uploading
  very slowly, say) is cut short: it gets 503 and may retry. That is the one bound on "no request
  fails".
- `index(state)`: every name the server knows, with its version and state.

Changing what a server runs is an administrator's act: `check_admin` requires the bearer token
of `FOCAL_ADMIN_TOKEN`, and without that setting the repository API is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from service import errors
from service.health import ModelHealth
from service.models import Model, ModelLoadError, ServedModel, check_model_folder, health_policy
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("focal.service")
T = TypeVar("T")


def check_admin(settings: Settings, authorization: str | None) -> None:
    """`authorization`: the request's Authorization header (or gRPC metadata), `Bearer <token>`."""
    if settings.admin_token is None:
        raise errors.Forbidden("the model repository API is off: start the server with FOCAL_ADMIN_TOKEN set")
    scheme, _, given = (authorization or "").partition(" ")
    expected = settings.admin_token.get_secret_value()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise errors.Unauthorized(
            "the model repository API needs 'Authorization: Bearer <FOCAL_ADMIN_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _info_labels(model: Model, info: dict[str, Any] | None = None) -> tuple[str, ...]:
    info = info or model.info()
    return (
        model.name, model.version, info["variant"], info["task"], info["backend"], info["device"],
        info["precision"], info["weights"],
    )  # fmt: skip


def announce(state: ServiceState, model: ServedModel) -> None:
    """A model now serving: its info metric and a log line."""
    info = model.info()
    state.metrics.model_info.labels(*_info_labels(model, info)).set(1)
    log.info(
        "serving %s version %s from %s",
        model.name,
        model.version,
        model.folder,
        extra={"fields": {"backend": info["backend"], "device": info["device"], "weights": info["weights"]}},
    )
    if model.random_init:
        log.warning("%s has RANDOM-INIT weights: its predictions are meaningless", model.name)


def _forget(state: ServiceState, model: Model) -> None:
    """Drop a model's info metric (it no longer serves)."""
    with contextlib.suppress(KeyError):
        state.metrics.model_info.remove(*_info_labels(model))


def _background(state: ServiceState, work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """Run repository work to its end even if its caller goes away (a cancelled gRPC call, a closed
    connection): a half-done switch would leave a model nobody closes. Shutdown waits for it."""
    task = asyncio.get_running_loop().create_task(work, name=name)
    state.repository_tasks.add(task)

    def done(finished: asyncio.Task[T]) -> None:
        state.repository_tasks.discard(finished)
        if not finished.cancelled() and finished.exception() is not None:  # retrieved: logged here or by the caller
            log.info("%s ended: %s", name, finished.exception())

    task.add_done_callback(done)
    return task


def _retire(state: ServiceState, model: Model) -> asyncio.Task[None]:
    """Close a model that no longer receives requests, in the background."""
    assert isinstance(model, ServedModel)  # the repository API is refused in front-end processes
    return _background(state, model.retire(state.settings.drain_timeout_s), f"retire-{model.name}-{model.version}")


def _check_can_change(state: ServiceState) -> None:
    if state.front_end:
        raise errors.NotImplementedHere(
            "the model repository API needs FOCAL_WORKERS=1: with several front-end processes the models "
            "live in the model host, which does not take loads and unloads (restart the server to change them)"
        )
    retry = {"Retry-After": str(state.settings.retry_after_s)}
    if state.draining:
        raise errors.Unavailable("the server is shutting down", headers=retry)
    if state.failed:
        raise errors.Unavailable(f"the server failed to start ({state.failed}); restart it", headers=retry)
    if state.loading:  # the start-up loader owns the models until it is done
        raise errors.Unavailable("the server is still loading its models; retry when it is ready", headers=retry)


def _lock(state: ServiceState, name: str) -> asyncio.Lock:
    return state.repository_locks.setdefault(name, asyncio.Lock())


async def load_model(state: ServiceState, name: str, folder: Path | None = None) -> ServedModel:
    """Serve `name` from `folder` (default: the folder it was last served from), replacing what
    serves it now without failing a request. `errors.ServiceError` when it cannot."""
    _check_can_change(state)
    return await asyncio.shield(_background(state, _load(state, name, folder), f"load-{name}"))


async def unload_model(state: ServiceState, name: str) -> None:
    """Stop serving `name`: new requests get 404 at once, running ones finish, then it closes."""
    _check_can_change(state)
    await asyncio.shield(_background(state, _unload(state, name), f"unload-{name}"))


async def _load(state: ServiceState, name: str, folder: Path | None) -> ServedModel:
    async with _lock(state, name):
        known = state.repository.get(name)
        folder = folder or (known.folder if known else None)
        if folder is None:
            raise errors.NotFound(f"model {name!r} is unknown here: name its export folder in the load request")
        loop = asyncio.get_running_loop()
        try:
            checked = await loop.run_in_executor(None, check_model_folder, folder, name)
        except ModelLoadError as exc:
            raise errors.BadRequest(f"cannot load {name}: {exc}") from None
        health = ModelHealth(health_policy(state.settings))
        log.info("loading %s version %s from %s", name, checked.version, folder)
        try:
            model = await loop.run_in_executor(
                None, ServedModel.load, checked, state.settings, state.metrics, health, state.backends
            )
        except Exception as exc:
            raise errors.BadRequest(f"cannot load {name} from {folder}: {type(exc).__name__}: {exc}") from None
        try:
            await model.warm_up()
        except Exception as exc:
            await model.close(0.0)
            raise errors.BadRequest(f"{name} from {folder} failed to warm up: {type(exc).__name__}: {exc}") from None
        if state.draining:  # shutdown began while it loaded
            await model.close(0.0)
            raise errors.Unavailable("the server is shutting down")
        old = state.models.get(name)
        state.models[name] = model  # the switch: the next lookup gets the new model
        state.repository[name] = checked
        if old is not None:
            _forget(state, old)
            log.info("%s: version %s replaces version %s; the old one finishes its requests", name, model.version,
                     old.version)  # fmt: skip
            _retire(state, old)
        announce(state, model)
        return model


async def _unload(state: ServiceState, name: str) -> None:
    async with _lock(state, name):
        model = state.models.pop(name, None)
        if model is None:
            raise errors.NotFound(f"model {name!r} is not loaded")
        _forget(state, model)
        log.info("unloading %s version %s", name, model.version)
        await _retire(state, model)


def index(state: ServiceState, ready_only: bool = False) -> list[dict[str, Any]]:
    """Every model this server knows: loaded (`READY`, `LOADING`, `UNAVAILABLE`) or unloaded."""
    entries = []
    for name, known in state.repository.items():
        model = state.models.get(name)
        if model is not None:
            ready, detail = model.health.readiness()
            entry = {"name": name, "version": model.version, "state": "READY" if ready else "UNAVAILABLE"}
            if not ready:
                entry["reason"] = detail
        elif (state.loading or state.failed) and any(p.name == name for p in state.planned):
            reason = f"failed: {state.failed}" if state.failed else "starting up"
            entry = {"name": name, "version": known.version, "state": "UNAVAILABLE" if state.failed else "LOADING"}
            entry["reason"] = reason
        else:
            entry = {"name": name, "version": known.version, "state": "UNAVAILABLE", "reason": "unloaded"}
        if not ready_only or entry["state"] == "READY":
            entries.append(entry)
    return entries


async def load_planned_models(state: ServiceState) -> None:
    """Load and warm up every model in turn; a failure leaves the server failed (not ready, not live)."""
    loop = asyncio.get_running_loop()
    for planned in state.planned:
        health = ModelHealth(health_policy(state.settings))
        try:
            model = await loop.run_in_executor(
                None, ServedModel.load, planned, state.settings, state.metrics, health, state.backends
            )
            state.models[model.name] = model
            await model.warm_up()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            health.failed(f"{type(exc).__name__}: {exc}")
            state.failed = f"{planned.name}: {type(exc).__name__}: {exc}"
            log.error("loading %s from %s failed: %s", planned.name, planned.folder, state.failed)
            return
        announce(state, model)
    state.loading = False


async def close_models(state: ServiceState) -> None:
    """At shutdown: wait for repository work still running, then drain and close every model side by
    side, all within what is left of the drain budget."""
    if state.repository_tasks:  # loads, and replaced or unloaded models finishing their last requests
        await asyncio.wait(state.repository_tasks, timeout=state.drain_remaining())
    remaining = state.drain_remaining()
    closed = await asyncio.gather(*(m.close(remaining) for m in state.models.values()), return_exceptions=True)
    for model, outcome in zip(state.models.values(), closed, strict=True):
        if isinstance(outcome, BaseException):
            log.error("closing %s failed: %s", model.name, outcome)
