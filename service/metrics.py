"""Prometheus metrics (one registry per app, so tests can run several apps in one process).

Average batch size = focal_batch_images_total / focal_batches_total (or from the
batch-size histogram); queue depth drives autoscaling.

With `FOCAL_WORKERS` > 1 every process (the front ends and the model host) writes its metrics
to files in PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode, set up by
`service.workers` before any of them starts), and `/metrics`, whichever front end answers it,
adds them all up: counters and histograms summed, each gauge by its `multiprocess_mode`.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

QUEUE_DEPTH_METRIC = "focal_queue_depth"  # the HorizontalPodAutoscaler's metric


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # protocol: "http" (this service's own API), "v2-http" or "v2-grpc" (the Open Inference Protocol);
        # code: the HTTP status, or the gRPC status name
        self.requests = Counter(
            "focal_requests", "requests by protocol, endpoint and status code", ["protocol", "endpoint", "code"],
            registry=r,
        )  # fmt: skip
        self.in_progress = Gauge(
            "focal_requests_in_progress",
            "requests received and not yet answered",
            ["protocol"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.request_seconds = Histogram(
            "focal_request_duration_seconds",
            "request latency",
            ["protocol", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "focal_queue_wait_seconds",
            "time an image waits in the queue",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "focal_batch_inference_seconds", "backend time per batch", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "focal_batch_size", "images per batch", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batches = Counter("focal_batches", "batches executed", ["model", "outcome"], registry=r)
        self.batch_images = Counter("focal_batch_images", "images run through the backend", ["model"], registry=r)
        self.batch_sources = Histogram(
            "focal_batch_front_ends",
            "front-end processes whose images one batch holds (1 with FOCAL_WORKERS=1)",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        # only the process running the batcher sets it
        self.queue_depth = Gauge(
            QUEUE_DEPTH_METRIC, "images waiting in the queue", ["model"], registry=r, multiprocess_mode="livesum"
        )
        self.dropped = Counter(
            "focal_dropped_images", "queued images dropped before running", ["model", "reason"], registry=r
        )
        self.probes = Counter(
            "focal_health_probes", "synthetic batches run to recover a failing model", ["model", "outcome"], registry=r
        )
        self.model_info = Gauge(
            "focal_model_info",
            "the loaded models (value 1)",
            ["model", "version", "variant", "task", "backend", "device", "precision", "weights"],
            registry=r,
            multiprocess_mode="livemax",
        )

    def observer(self, model: str) -> ModelObserver:
        return ModelObserver(self, model)

    def exposition(self) -> bytes:
        """The text /metrics answers: this registry, or every process's metrics in multiprocess mode."""
        folder = os.environ.get(MULTIPROCESS_DIR)
        if not folder:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=folder)
        return generate_latest(registry)


MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


class ModelObserver:
    """The batcher's view of the metrics of one model."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.m, self.model = metrics, model

    def queue_depth(self, depth: int) -> None:
        self.m.queue_depth.labels(self.model).set(depth)

    def batch_done(
        self, size: int, queue_waits: list[float], seconds: float, error: str | None, sources: int = 1
    ) -> None:
        self.m.batch_size.labels(self.model).observe(size)
        self.m.batch_sources.labels(self.model).observe(sources)
        self.m.batch_seconds.labels(self.model).observe(seconds)
        self.m.batches.labels(self.model, "ok" if error is None else "error").inc()
        self.m.batch_images.labels(self.model).inc(size)
        for wait in queue_waits:
            self.m.queue_seconds.labels(self.model).observe(wait)

    def dropped(self, reason: str) -> None:
        self.m.dropped.labels(self.model, reason).inc()
