"""Errors of the gRPC surface and the status codes every exception is reported with (cluster/grpc_service.py):
bad input (ValueError) -> INVALID_ARGUMENT, unknown model or health service -> NOT_FOUND,
EngineOverloaded -> RESOURCE_EXHAUSTED, an engine stopped or still loading -> UNAVAILABLE."""

from __future__ import annotations

import grpc

from cluster.async_engine import EngineOverloaded, EngineStopped


class NotFound(LookupError):
    """The request names a model or health service this server does not serve."""


class EngineUnavailable(RuntimeError):
    """The standalone server is up but its engine is still loading (or failed to load)."""


class RequestEnded(RuntimeError):
    """The engine ended the request without finishing it ("abort" or "error")."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_STATUS: tuple[tuple[type | tuple[type, ...], grpc.StatusCode], ...] = (  # first match wins
    (EngineOverloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ((EngineStopped, EngineUnavailable), grpc.StatusCode.UNAVAILABLE),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status an exception from the functions below is reported with; None: not ours (re-raise)."""
    if isinstance(exc, RequestEnded):
        code = grpc.StatusCode.ABORTED if exc.reason == "abort" else grpc.StatusCode.INTERNAL
        return code, str(exc)
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code, str(exc) or type(exc).__name__
    return None
