"""Errors as TF Serving reports them: a canonical status code and a message.

The same ``ServingError`` becomes a gRPC status (``grpc.StatusCode[code]``) or an HTTP reply
``{"error": message}`` with TF Serving's status-to-HTTP mapping (``http_server.cc``).
"""

from __future__ import annotations

# tensorflow_serving/model_servers/http_server.cc ToHTTPStatusCode
HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}

# tensorflow/core/protobuf/error_codes.proto, used in ModelVersionStatus.status.error_code
ERROR_CODE_NUMBER = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}


class ServingError(Exception):
    """A request or load failure with a TF canonical status code (e.g. ``"NOT_FOUND"``)."""

    def __init__(self, code: str, message: str):
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown status code {code!r}; expected one of {sorted(HTTP_STATUS)}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def __repr__(self) -> str:
        return f"ServingError({self.code}, {self.message!r})"


def invalid_argument(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def not_found(message: str) -> ServingError:
    return ServingError("NOT_FOUND", message)


def failed_precondition(message: str) -> ServingError:
    return ServingError("FAILED_PRECONDITION", message)


def request_version(value) -> int:
    """A requested version (REST path text or gRPC int64) -> int, else INVALID_ARGUMENT.

    The one version-id check of every API: ``fm_keras.versions.parse_version`` (ASCII digits,
    within int64, not negative).
    """
    from fm_keras.versions import parse_version

    try:
        return parse_version(value)
    except ValueError as err:
        raise invalid_argument(f"Invalid version: {err}") from None
