"""Errors shared by both sides, each carrying the gRPC status it maps to.

The status is kept as a plain string (the name of a ``grpc.StatusCode``) so
that this module does not import grpc: the transport layer translates.
"""


class SplitKDError(Exception):
    """Base class: a problem a person can act on, with a one-line message."""

    status = "INTERNAL"


class InvalidArgument(SplitKDError):
    """The request itself is malformed (dtype, shape, bytes, NaN, ...)."""

    status = "INVALID_ARGUMENT"


class NotFound(SplitKDError):
    """An unknown or expired session, model or version."""

    status = "NOT_FOUND"


class FailedPrecondition(SplitKDError):
    """The request is well formed but does not fit the current state."""

    status = "FAILED_PRECONDITION"


class ResourceExhausted(SplitKDError):
    """A size or count limit was reached."""

    status = "RESOURCE_EXHAUSTED"


class Unauthenticated(SplitKDError):
    """No credentials, an unknown device, or a wrong credential."""

    status = "UNAUTHENTICATED"


class PermissionDenied(SplitKDError):
    """A known caller asking for something that is not its own (or a revoked device)."""

    status = "PERMISSION_DENIED"


class Unavailable(SplitKDError):
    """Try again shortly: shared storage does not answer, or another replica serves this."""

    status = "UNAVAILABLE"
