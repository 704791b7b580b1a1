"""The service's domain errors: what went wrong, in words a client can act on, without a
transport. The data plane raises them; each transport maps them once to its own status codes
(app.HTTP_STATUS, grpc_server.GRPC_STATUS), so HTTP and gRPC clients get the same message.

    NotReady         the model is loading or failed to load       503 / UNAVAILABLE
    UnknownModel     no such model or version                     404 / NOT_FOUND
    BadRequest       malformed request, wrong tensor, bad image   400 / INVALID_ARGUMENT
    TooLarge         a body or message over the size limit        413 / RESOURCE_EXHAUSTED
    Overloaded       the queue is full, or all bodies in flight    503 + Retry-After / UNAVAILABLE
                     hold --max-buffered-mb
    TimedOut         past --timeout-s                             504 / DEADLINE_EXCEEDED
    ClientTimeout    the client sent its body too slowly          408
    Unauthenticated  no API key or a wrong one                    401 / UNAUTHENTICATED
"""
from __future__ import annotations

from common.errors import UserError


class ServiceError(UserError):
    """A request the service refuses; `retry_after` (seconds) when retrying later may work."""

    retry_after: float | None = None

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after


class NotReady(ServiceError):
    retry_after = 1.0


class UnknownModel(ServiceError):
    pass


class BadRequest(ServiceError):
    pass


class TooLarge(BadRequest):
    pass


class Overloaded(ServiceError):
    retry_after = 1.0


class TimedOut(ServiceError):
    pass


class ClientTimeout(BadRequest):
    pass


class Unauthenticated(ServiceError):
    pass
