"""The errors the JSON API answers with: a name for `__type`, an HTTP status, one message.

The AWS CLI and boto3 show nothing useful unless the body carries `__type`, so every
failure of an API call, including authentication, is raised as an ApiError and turned into
`{"__type": ..., "message": ...}` in one place (protocol.py).
"""

from __future__ import annotations

from controlplane.apimodel import ERROR_STATUS

# Errors of the AWS JSON protocol itself, not in the service model.
PROTOCOL_ERROR_STATUS: dict[str, int] = {
    "UnknownOperationException": 400,
    "SerializationException": 400,
    "IncompleteSignatureException": 400,
    "MissingAuthenticationTokenException": 403,
    "UnrecognizedClientException": 403,
    "InvalidSignatureException": 403,
    # The listener's own answer to a request head over its size bound (server.py).
    "RequestHeaderFieldsTooLargeException": 431,
}


class ApiError(Exception):
    """A failed API call; `code` is the `__type` the client sees."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = ERROR_STATUS.get(code) or PROTOCOL_ERROR_STATUS.get(code, 400)


def validation(message: str) -> ApiError:
    return ApiError("ValidationException", message)


def not_found(message: str) -> ApiError:
    return ApiError("ResourceNotFoundException", message)


def conflict(message: str) -> ApiError:
    return ApiError("ConflictException", message)
