"""Errors the API answers with: `{"error": {"code", "message", "request_id"}}` and the HTTP status."""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self, request_id: str) -> dict[str, dict[str, str]]:
        """The JSON body every error response carries."""
        return {"error": {"code": self.code, "message": self.message, "request_id": request_id}}


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class BadImage(ServiceError):
    status, code = 400, "bad_image"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidParameter(ServiceError):
    status, code = 422, "invalid_parameter"


class NotImplementedHere(ServiceError):
    status, code = 501, "not_implemented"


class Overloaded(ServiceError):
    status, code = 429, "overloaded"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


class Timeout(ServiceError):
    status, code = 504, "timeout"


class BackendFailed(ServiceError):
    status, code = 500, "backend_error"
