"""All configuration of the service, in one place: `FOCAL_*` environment variables or CLI flags."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BackendChoice = Literal["auto", "tensorrt", "onnxruntime", "torch"]
MAX_WORKERS = 64
DEFAULT_WORKERS_CAP = 16  # each front end holds ~100 MB and decodes ~100 images/s per core
GPU_QUEUE_DELAY_MS = 5.0  # the default wait on GPUs, where a bigger batch costs little more than a small one


class Settings(BaseSettings):
    """Every field can be set as FOCAL_<NAME> (e.g. FOCAL_MODELS=dir1,dir2, FOCAL_PORT=8080)."""

    model_config = SettingsConfigDict(env_prefix="FOCAL_", extra="forbid")

    models: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="export folders (python -m export output), comma-separated; NAME=DIR serves one as NAME "
        "(default: its variant, e.g. focal_tiny, or focal_tiny_retinanet for a detector)",
    )
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="the Open Inference Protocol over gRPC (KServe v2); 0 turns it off"
    )
    admin_token: SecretStr | None = Field(
        None,
        min_length=16,
        description="bearer token of the model repository API (load/unload models); unset: that API is off",
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=MAX_WORKERS,
        description="HTTP front-end processes on the port; with more than one, a model host process runs the "
        f"models and all front ends feed its one batcher per model (default: one per usable core, at most "
        f"{DEFAULT_WORKERS_CAP}, or 1 when FOCAL_ADMIN_TOKEN turns the model repository API on; 1: one process)",
    )
    backend: BackendChoice = Field("auto", description="auto: TensorRT engine if usable, else onnxruntime")
    max_batch_size: int | None = Field(None, ge=1, description="default: the export's max batch")
    max_queue_delay_ms: float | None = Field(
        None,
        ge=0,
        description=f"wait after the first queued image for more; default {GPU_QUEUE_DELAY_MS:g} on GPUs, 0 on the "
        "CPU (where a batch of 8 takes 8x a batch of 1, so waiting only adds latency; under load batches still form)",
    )
    max_queue_size: int = Field(256, ge=1, description="images waiting per model; more are refused with 429")
    request_timeout_s: float = Field(30.0, gt=0, description="a queued image older than this gets 504")
    preprocess_threads: int = Field(4, ge=1)
    jpeg_draft: bool = Field(
        True,
        description="decode a JPEG at least twice the size the model needs at a reduced scale (~4x cheaper); "
        "false: decode every image in full first, as mmdetection and the official evaluation do",
    )
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime CPU threads (0: one per core)")
    intra_op_spinning: bool = Field(
        True, description="onnxruntime's CPU threads spin-wait for work between ops instead of sleeping"
    )
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    max_images_per_request: int = Field(32, ge=1)
    drain_timeout_s: float = Field(
        25.0, ge=0, description="on SIGTERM, time allowed for queued work (below Kubernetes' default 30 s grace)"
    )
    retry_after_s: int = Field(1, ge=0, description="the Retry-After header of 429 and 503 answers")
    # Health (service/health.py): readiness, recovery probes, liveness.
    failing_after_batches: int = Field(
        3, ge=1, description="this many failed batches in a row make a model failing: readiness turns false"
    )
    probe_backoff_s: float = Field(
        1.0, gt=0, description="a failing model is probed with a synthetic batch after this, then at doubling waits"
    )
    probe_backoff_max_s: float = Field(30.0, gt=0, description="the longest wait between two probes")
    unhealthy_after_s: float = Field(
        60.0, gt=0, description="a model failing for this long (probes included) turns liveness false: a restart"
    )
    stuck_batch_s: float = Field(
        60.0, gt=0, description="a batch running for longer than this means a stuck backend: liveness turns false"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def queue_delay_ms(self, device: str) -> float:
        """The batcher's wait window on this device: the setting, else the device's default."""
        if self.max_queue_delay_ms is not None:
            return self.max_queue_delay_ms
        return 0.0 if device == "cpu" else GPU_QUEUE_DELAY_MS

    def worker_count(self) -> int:
        """The number of front-end processes: the setting; else 1 when the model repository API is on
        (loads and unloads need the models in the process that serves them), else one per usable core
        (capped)."""
        if self.workers:
            return self.workers
        return 1 if self.admin_token is not None else min(usable_cores(), DEFAULT_WORKERS_CAP)

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """Surrounding whitespace dropped (a token read from a file ends in a newline); empty is unset."""
        value = value.strip() if isinstance(value, str) else value
        return None if value == "" else value

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        if self.grpc_port == self.port:
            raise ValueError(f"grpc_port and port are both {self.port}: give gRPC its own port (or 0 for none)")
        return self

    @field_validator("models", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


def usable_cores() -> int:
    """The cores this process may run on, within its container's CPU quota (cgroup v2 cpu.max)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores
