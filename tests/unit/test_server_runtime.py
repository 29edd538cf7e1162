"""The shared runtime with a fake engine: status mapping, health, reflection, drain."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from services.common.config import ServerConfig, load_config
from services.common.errors import InvalidArgument
from services.common.server import Stage, serve


class FakeTranslation(translate_pb2_grpc.TranslationServicer):
    def __init__(self, release: asyncio.Event):
        self.release = release

    async def Translate(self, request, context):
        if not request.texts:
            raise InvalidArgument("texts is empty")
        if request.texts[0] == "crash":
            raise RuntimeError("boom")
        if request.texts[0] == "slow":
            await self.release.wait()
        return translate_pb2.TranslateResponse(
            request_id=request.request_id, translations=list(request.texts)
        )


async def _start(release: asyncio.Event, stop: asyncio.Event, grace_s: float = 5.0):
    ready = Path(tempfile.mkdtemp()) / "ready"
    config = dataclasses.replace(ServerConfig(), ready_file=str(ready), drain_delay_s=0.3, grace_s=grace_s)
    stage = Stage(
        name="fake",
        service_names=("parley.translate.v1.Translation",),
        load=lambda config: None,
        add_servicers=lambda server, engine, config: translate_pb2_grpc.add_TranslationServicer_to_server(
            FakeTranslation(release), server
        ),
    )
    task = asyncio.create_task(serve(stage, config, stop=stop))
    async with asyncio.timeout(10):
        while not ready.exists():  # noqa: ASYNC110 - the server signals readiness through a file only
            await asyncio.sleep(0.01)
    return task, ready.read_text()


async def test_errors_map_to_status_codes_and_server_keeps_serving():
    release, stop = asyncio.Event(), asyncio.Event()
    task, address = await _start(release, stop)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = translate_pb2_grpc.TranslationStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Translate(translate_pb2.TranslateRequest())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "texts is empty" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Translate(translate_pb2.TranslateRequest(texts=["crash"]))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        ok = await stub.Translate(translate_pb2.TranslateRequest(request_id="r1", texts=["a"]))
        assert ok.request_id == "r1" and list(ok.translations) == ["a"]
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_health_reflection_and_graceful_drain():
    release, stop = asyncio.Event(), asyncio.Event()
    task, address = await _start(release, stop)
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        response = await health.Check(
            health_pb2.HealthCheckRequest(service="parley.translate.v1.Translation")
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in replies for s in r.list_services_response.service]
        assert "parley.translate.v1.Translation" in names and "grpc.health.v1.Health" in names

        stub = translate_pb2_grpc.TranslationStub(channel)
        in_flight = asyncio.ensure_future(stub.Translate(translate_pb2.TranslateRequest(texts=["slow"])))
        await asyncio.sleep(0.1)
        stop.set()
        await asyncio.sleep(0.1)
        response = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
        release.set()
        assert list((await asyncio.wait_for(in_flight, 5)).translations) == ["slow"]
    await asyncio.wait_for(task, 10)


def test_config_precedence_flag_env_default():
    config = load_config(ServerConfig, ["--port", "7"], env={"PARLEY_PORT": "5", "PARLEY_GRACE_S": "2.5"})
    assert config.port == 7 and config.grace_s == 2.5 and config.host == "127.0.0.1"
    with pytest.raises(SystemExit):
        load_config(ServerConfig, [], env={"PARLEY_PORT": "x"})
