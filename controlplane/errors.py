"""The errors the API answers with: a name for `__type`, an HTTP status, one message.

The AWS CLI and boto3 show nothing useful unless the body carries `__type`, so every
failure of an API call, including authentication, is raised as an ApiError and turned into
one body in one place (protocol.py), in the shape of the protocol the call used.

The model's error shapes (ValidationException, ConflictException, ...) have two members,
`ErrorCode` (required in some) and `Message`; botocore parses a modelled error's body
against its shape and puts those members into `e.response`, so the body carries them as
well as `__type` and `message` (what botocore reads for `Error.Code`/`Error.Message`).
`ErrorCode` is a short machine-readable reason: the raiser's own when it has a more
specific one, else the error's name.
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
    # rpcv2Cbor: an Accept header that rules out application/cbor.
    "NotAcceptableException": 406,
}

# The model's error shapes; each has the members ErrorCode and Message (a unit test checks
# this against botocore's model: tests/controlplane/test_protocol_fidelity.py).
MODELED_ERRORS = frozenset(ERROR_STATUS)


class ApiError(Exception):
    """A failed API call; `code` is the `__type` the client sees, `error_code` the model's
    `ErrorCode` member (defaults to `code`)."""

    def __init__(self, code: str, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.error_code = error_code or code
        self.status = ERROR_STATUS.get(code) or PROTOCOL_ERROR_STATUS.get(code, 400)

    def members(self) -> dict[str, str]:
        """The body's members besides `__type`: `message` (what botocore reads first),
        `Message`, and `ErrorCode` when the model's shape for `code` has it."""
        out = {"message": self.message, "Message": self.message}
        if self.code in MODELED_ERRORS:
            out["ErrorCode"] = self.error_code
        return out


def validation(message: str, error_code: str | None = None) -> ApiError:
    return ApiError("ValidationException", message, error_code)


def not_found(message: str, error_code: str | None = None) -> ApiError:
    return ApiError("ResourceNotFoundException", message, error_code)


def conflict(message: str, error_code: str | None = None) -> ApiError:
    return ApiError("ConflictException", message, error_code)


# AWS Backup (service `backup`, restJson1; restjson.py). Its model gives none of its error
# shapes an `httpStatusCode`, so each answers with the status botocore and Smithy assume for
# it: 500 for a fault, else 400. Two names mean another status here than in backup-gateway
# (ResourceNotFoundException 400, not 404; ConflictException 400, not 409), which is why the
# `backup` wire takes its status from this table first (backup_status). Checked against
# botocore's model by tests/controlplane/test_backupmodel.py.
BACKUP_ERROR_STATUS: dict[str, int] = {
    "AlreadyExistsException": 400,
    "ConflictException": 400,
    "DependencyFailureException": 500,
    "InvalidParameterValueException": 400,
    "InvalidRequestException": 400,
    "InvalidResourceStateException": 400,
    "LimitExceededException": 400,
    "MissingParameterValueException": 400,
    "ResourceNotFoundException": 400,
    "ServiceUnavailableException": 500,
}


def backup_status(err: ApiError) -> int:
    """The HTTP status of `err` on the `backup` wire: the `backup` model's for its own error
    shapes, else the one it has everywhere (authentication, throttling, internal errors)."""
    return BACKUP_ERROR_STATUS.get(err.code, err.status)
