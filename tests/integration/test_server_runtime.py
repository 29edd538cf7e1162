"""The shared runtime with a fake engine: status mapping, health, reflection, drain."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import tempfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from parley.audio.v1 import audio_pb2
from parley.gateway.v1 import gateway_pb2
from parley.stt.v1 import stt_pb2, stt_pb2_grpc
from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from parley.vad.v1 import vad_pb2, vad_pb2_grpc
from services.common.config import ServerConfig, load_config
from services.common.errors import InvalidArgument
from services.common.messages import check_enums
from services.common.server import Stage, StatusMappingInterceptor, serve
from services.common.telemetry import server_interceptors


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


class EchoStt(stt_pb2_grpc.SpeechToTextServicer):
    async def Transcribe(self, request, context):
        return stt_pb2.TranscribeResponse(request_id=request.request_id)


class EchoVad(vad_pb2_grpc.VoiceActivityDetectionServicer):
    async def StreamDetect(self, request_iterator, context):
        async for request in request_iterator:
            yield vad_pb2.StreamDetectResponse(request_id=request.config.request_id)


@contextlib.asynccontextmanager
async def _intercepted_server():
    """Fake STT and VAD servicers behind the interceptors the stages run with."""
    server = grpc.aio.server(interceptors=[*server_interceptors(), StatusMappingInterceptor()])
    stt_pb2_grpc.add_SpeechToTextServicer_to_server(EchoStt(), server)
    vad_pb2_grpc.add_VoiceActivityDetectionServicer_to_server(EchoVad(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(0)


TRANSCRIBE = "/parley.stt.v1.SpeechToText/Transcribe"
STREAM_DETECT = "/parley.vad.v1.VoiceActivityDetection/StreamDetect"
GARBAGE = b"\xff\xff\xff\xff"


def _count(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value("parley_grpc_requests_total", {"method": method, "code": code})
    return value or 0.0


async def _stream_error(channel, messages: list[bytes]) -> grpc.aio.AioRpcError:
    call = channel.stream_stream(STREAM_DETECT)(iter(messages))  # raw bytes: no serializer
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    return err.value


@pytest.mark.timeout(30)
async def test_undecodable_requests_are_invalid_argument_logged_at_warning_without_traceback(caplog):
    caplog.set_level(logging.WARNING)
    before = {
        (m, c): _count(m, c) for m in (TRANSCRIBE, STREAM_DETECT) for c in ("INVALID_ARGUMENT", "INTERNAL")
    }
    async with _intercepted_server() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(TRANSCRIBE)(GARBAGE)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "request is not a valid parley.stt.v1.TranscribeRequest" in err.value.details()
        config = vad_pb2.StreamDetectRequest(config=vad_pb2.StreamDetectConfig(request_id="r"))
        error = await _stream_error(channel, [config.SerializeToString(), GARBAGE])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "request is not a valid parley.vad.v1.StreamDetectRequest" in error.details()
        # The server goes on serving well-formed calls.
        ok = await stt_pb2_grpc.SpeechToTextStub(channel).Transcribe(
            stt_pb2.TranscribeRequest(request_id="ok")
        )
        assert ok.request_id == "ok"
    for method in (TRANSCRIBE, STREAM_DETECT):
        assert _count(method, "INVALID_ARGUMENT") == before[(method, "INVALID_ARGUMENT")] + 1
        assert _count(method, "INTERNAL") == before[(method, "INTERNAL")]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.WARNING], [
        r.getMessage() for r in warnings
    ]
    assert all(r.exc_info is None and "not a valid" in r.getMessage() for r in warnings)


@pytest.mark.timeout(30)
async def test_undefined_enum_values_are_invalid_argument_naming_the_field():
    async with _intercepted_server() as channel:
        request = stt_pb2.TranscribeRequest(config=stt_pb2.RecognitionConfig(task=99))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stt_pb2_grpc.SpeechToTextStub(channel).Transcribe(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "config.task 99 is not defined in parley.stt.v1.Task" in err.value.details()
        assert "TRANSLATE (2)" in err.value.details()
        config = vad_pb2.StreamDetectRequest(
            config=vad_pb2.StreamDetectConfig(format=audio_pb2.AudioFormat(encoding=9))
        )
        error = await _stream_error(channel, [config.SerializeToString()])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "config.format.encoding 9 is not defined in parley.audio.v1.AudioEncoding" in error.details()


def test_check_enums_walks_nested_and_repeated_fields():
    check_enums(stt_pb2.TranscribeRequest(config=stt_pb2.RecognitionConfig(task=stt_pb2.TRANSLATE)))
    response = gateway_pb2.TranslateSpeechResponse(
        transcript=gateway_pb2.Transcript(text="fine"), utterance_index=3
    )
    check_enums(response)
    bad = gateway_pb2.TranslateSpeechRequest(config=gateway_pb2.TranslateSpeechConfig(mode=7))
    with pytest.raises(
        InvalidArgument, match=r"config\.mode 7 is not defined in parley\.gateway\.v1\.TranslationMode"
    ):
        check_enums(bad)
