"""Response schemas every route shares (they make the OpenAPI document at /docs); each task's
own response schema lives with the task (`service.tasks`)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ModelInfo(BaseModel):
    name: str = Field(description="what the Open Inference Protocol addresses it by (/v2/models/{name})")
    version: str
    variant: str
    task: str
    input_size: list[int] = Field(description="[height, width] of the model input (a detector: its largest canvas)")
    canvases: list[list[int]] | None = Field(
        None, description="a detector: every canvas [height, width] it routes images to (README: Detection)"
    )
    num_classes: int
    precision: str
    backend: str
    device: str
    max_batch_size: int
    max_queue_delay_ms: float
    batch: dict[str, int]
    weights: str = Field(description="'file', 'pretrained' or 'random-init' (untrained: predictions are meaningless)")
    weights_sha256: str | None
    weights_role: str = Field(
        description="what the weights file held: 'classifier', 'detector', or 'backbone' (detection head untrained)"
    )
    random_init: bool = Field(description="true when any part of the model is untrained")


class ModelStatus(ModelInfo):
    ready: bool
    status: str = Field(description="'loading', 'warming up', 'ready', 'failing' (probing to recover) or 'failed'")
    warmup_seconds: float | None


class ModelsResponse(BaseModel):
    models: list[ModelStatus]


class Health(BaseModel):
    status: str
    detail: str | None = None


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorBody
