"""Response schemas (they make the OpenAPI document at /docs)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ModelInfo(BaseModel):
    name: str
    variant: str
    task: str
    input_size: list[int]
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


class Prediction(BaseModel):
    class_id: int
    label: str
    score: float = Field(description="softmax probability")


class ClassifyResult(BaseModel):
    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    model: ModelInfo
    results: list[ClassifyResult] = Field(description="one result per image, in request order")


class Detection(BaseModel):
    class_id: int
    label: str
    score: float = Field(description="sigmoid class probability")
    box: list[float] = Field(description="[x1, y1, x2, y2] in the original image's pixels (after EXIF rotation)")


class DetectResult(BaseModel):
    detections: list[Detection] = Field(description="best first, after class-aware NMS")
    image_size: list[int] = Field(description="[width, height] of the image the boxes refer to")


class DetectResponse(BaseModel):
    model: ModelInfo
    results: list[DetectResult] = Field(description="one result per image, in request order")


class ModelStatus(ModelInfo):
    ready: bool
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
