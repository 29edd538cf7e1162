"""The gateway's channel options against real gRPC servers: round-robin over every address a target
resolves to, skipping the ones whose grpc.health.v1 status is not SERVING (client-side health checking).

Two health-only servers on port 0 stand for two replicas of a stage; the target lists both, as DNS does for
a scaled Compose service or a headless Kubernetes Service.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from services.gateway.config import GatewayConfig
from services.gateway.downstream import channel_options

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]


# Check("who") tells the replicas apart: SERVING from the first, SERVICE_UNKNOWN from the second.
WHO = {"a": health_pb2.HealthCheckResponse.SERVING, "b": health_pb2.HealthCheckResponse.SERVICE_UNKNOWN}


async def replica(name: str) -> tuple[grpc.aio.Server, HealthServicer, int]:
    server = grpc.aio.server()
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set("who", WHO[name])
    return server, health, port


async def answered_by(stub, calls: int) -> Counter[str]:
    by_status = {status: name for name, status in WHO.items()}
    seen: Counter[str] = Counter()
    for _ in range(calls):
        response = await stub.Check(health_pb2.HealthCheckRequest(service="who"), timeout=2)
        seen[by_status[response.status]] += 1
    return seen


async def test_calls_alternate_between_replicas_and_skip_one_not_serving():
    (a, _, port_a), (b, health_b, port_b) = await replica("a"), await replica("b")
    target = f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}"
    try:
        async with grpc.aio.insecure_channel(target, options=channel_options(GatewayConfig())) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await asyncio.wait_for(channel.channel_ready(), 5)
            await asyncio.sleep(0.5)  # both subchannels connected and watched
            assert await answered_by(stub, 10) == Counter(a=5, b=5)

            await health_b.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # b drains
            await asyncio.sleep(0.5)
            assert await answered_by(stub, 10) == Counter(a=10)
    finally:
        await asyncio.gather(a.stop(0), b.stop(0))
