"""Each task's serving side: one module per task, registered here.

A task module owns the whole path of its requests after decoding: its transform
(image -> model input) and its exact inverse where outputs refer to the image,
its post-processing, its response schema and its route. The generic parts
(reading bodies, decoding, batching, errors) are `service.api`'s and `service.inference`'s;
`protocol` gives the task's outputs in the Open Inference Protocol (`service.v2`).

Adding a task: a module here that builds a `ServiceTask`, a line in `TASKS`, its
export hooks in `export/tasks/` and its manifest section in `manifest/`.
"""

from __future__ import annotations

from service.tasks import classify, detect
from service.tasks.base import ModelInput, Placed, ProtocolOutputs, ServiceTask, TensorMeta, Transform

TASKS: dict[str, ServiceTask] = {task.name: task for task in (classify.TASK, detect.TASK)}

__all__ = ["TASKS", "ModelInput", "Placed", "ProtocolOutputs", "ServiceTask", "TensorMeta", "Transform"]
