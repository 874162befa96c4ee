"""grpc.health.v1 over the engine's readiness: NOT_SERVING until the engine is ready (cluster/grpc_service.py
serves it through Ray Serve and on the standalone server)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator, Callable

from grpc_health.v1 import health_pb2

from cluster.grpc_status import NotFound
from protos import moe_serve_pb2 as pb

if TYPE_CHECKING:
    from cluster.async_engine import AsyncLLMEngine

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MoeServe"].full_name  # "moeserve.v1.MoeServe"
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)  # "" is the whole server
WATCH_POLL_S = 0.25


def serving_status(engine: AsyncLLMEngine | None, service: str) -> int:
    """SERVING when the engine exists and is ready; None is an engine still loading."""
    if service not in HEALTH_SERVICES:
        return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    ready = engine is not None and engine.ready
    return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING


def health_check(engine: AsyncLLMEngine | None,
                 request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
    status = serving_status(engine, request.service)
    if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
        raise NotFound(f"unknown health service {request.service!r}; known: {list(HEALTH_SERVICES)}")
    return health_pb2.HealthCheckResponse(status=status)


def health_list(engine: AsyncLLMEngine | None) -> health_pb2.HealthListResponse:
    return health_pb2.HealthListResponse(statuses={
        name: health_pb2.HealthCheckResponse(status=serving_status(engine, name)) for name in HEALTH_SERVICES})


async def health_watch(engine: Callable[[], AsyncLLMEngine | None],
                       request: health_pb2.HealthCheckRequest) -> AsyncIterator[health_pb2.HealthCheckResponse]:
    """The current status, then every change (polled), until the caller goes away."""
    last = None
    while True:
        status = serving_status(engine(), request.service)
        if status != last:
            yield health_pb2.HealthCheckResponse(status=status)
            last = status
        await asyncio.sleep(WATCH_POLL_S)
