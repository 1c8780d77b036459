"""Each task's export hooks: one module per task, behind one interface (`ExportTask`).

The pipeline (`export.pipeline`) runs the same steps for every task; what differs
is asked of the task: which options it accepts, how its model is built and its
weights loaded, which graphs it exports (the served one, and the one verification
reads), how each graph is verified, and the task's part of the manifest.

Adding a task: a module here with an `ExportTask` subclass, a line in `TASKS`, its
manifest section in `manifest/`, and its serving side in `service/tasks/`.
"""

from __future__ import annotations

from export.options import ExportError
from export.tasks.base import ExportTask, Graphs
from export.tasks.classify import ClassifyTask
from export.tasks.detect import DetectTask

TASKS: dict[str, ExportTask] = {task.name: task for task in (ClassifyTask(), DetectTask())}

__all__ = ["TASKS", "ExportTask", "Graphs", "get_task"]


def get_task(name: str) -> ExportTask:
    if name not in TASKS:
        raise ExportError(f"--task must be one of {', '.join(TASKS)}")
    return TASKS[name]
