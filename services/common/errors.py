"""Errors raised by engines and servicers, mapped to gRPC status codes in one place.

Engines import no grpc: they raise these exceptions, and
:class:`services.common.server.StatusMappingInterceptor` turns each into its status code.
"""


class ParleyError(Exception):
    """Base class. ``code`` names the ``grpc.StatusCode`` member the error maps to."""

    code = "INTERNAL"


class InvalidArgument(ParleyError):
    """Bad input from the caller: fix the request and retry."""

    code = "INVALID_ARGUMENT"


class FailedPrecondition(ParleyError):
    """The server lacks something the request needs (for example a voice for a language)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(ParleyError):
    """Overload: a queue or a stream limit is full. Retry later, with backoff."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ParleyError):
    """The model or a downstream service cannot serve now. Safe to retry idempotent calls."""

    code = "UNAVAILABLE"


class DeadlineExceeded(ParleyError):
    """The caller's deadline passed before the work could be done."""

    code = "DEADLINE_EXCEEDED"


class DataLoss(ParleyError):
    """Audio that was needed is gone (a defect: backpressure should have kept it)."""

    code = "DATA_LOSS"
