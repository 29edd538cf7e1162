"""Fuzzing every RPC of the five real servers: generated requests and mutated request bytes.

For each RPC, hypothesis sends the real servers three kinds of requests: valid requests (a hand-written
seed per RPC: real speech, a real sentence) with one to three fields, nested ones included, replaced by
generated values, which reach the models; messages generated from the proto descriptors alone (every
field, enums out of range, NaN and huge numbers, control characters, oneofs, nested messages); and byte
mutations of serialized requests (flipped, cut, inserted bytes). Only documented statuses may
come back: OK, INVALID_ARGUMENT, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, OUT_OF_RANGE and the call's own
DEADLINE_EXCEEDED; never INTERNAL or UNKNOWN. Afterwards every server still reports SERVING.

Bounded for CI: ``PARLEY_FUZZ_EXAMPLES`` examples per RPC (default 60, about 25 s for all eleven RPCs
here); texts and audio stay short so that a valid request costs at most a short inference.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parley.audio.v1 import audio_pb2
from parley.gateway.v1 import gateway_pb2
from parley.stt.v1 import stt_pb2
from parley.translate.v1 import translate_pb2
from parley.tts.v1 import tts_pb2
from parley.vad.v1 import vad_pb2
from services.clients.cluster import check_health
from services.harness import read_wav, start_server
from tests.helpers import read_manifest

pytestmark = pytest.mark.timeout(900)

EXAMPLES = int(os.environ.get("PARLEY_FUZZ_EXAMPLES", "60"))
CALL_TIMEOUT_S = 20.0
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
MAX_TEXT = 24
MAX_BYTES = 6400  # 0.2 s of 16 kHz PCM_S16LE

FD = pb_descriptor.FieldDescriptor
_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FD.TYPE_BOOL: st.booleans(),
    FD.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FD.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FD.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FD.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    FD.TYPE_FLOAT: st.floats(width=32) | st.sampled_from([0.0, 1.0, 0.5, 16000.0, math.inf, math.nan]),
    FD.TYPE_DOUBLE: st.floats() | st.sampled_from([0.0, 1.0, 0.5, math.inf, math.nan]),
    FD.TYPE_STRING: st.text(max_size=MAX_TEXT)
    | st.sampled_from(["", "en", "fr", "de", "tr", "Hello there.", "Bonjour.", "a\x00b", "x" * MAX_TEXT]),
    FD.TYPE_BYTES: st.binary(max_size=MAX_BYTES) | st.just(b"\0" * MAX_BYTES),
}
# Fields where a plausible value reaches deeper code than a random one.
_PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "sample_rate_hz": st.sampled_from([0, 1, 8000, 16000, 22050, 48000, 10**9]),
    "channels": st.integers(0, 3),
}


def _enum(field: pb_descriptor.FieldDescriptor) -> st.SearchStrategy[int]:
    known = [v.number for v in field.enum_type.values]
    return st.sampled_from(known) | st.integers(-5, 200)


def _value(field: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FD.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    if field.type == FD.TYPE_ENUM:
        return _enum(field)
    return _PLAUSIBLE.get(field.name, _SCALARS[field.type])


def _is_repeated(field: pb_descriptor.FieldDescriptor) -> bool:
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == FD.LABEL_REPEATED


@st.composite
def _message(draw: Callable[..., Any], descriptor: pb_descriptor.Descriptor, depth: int) -> bytes:
    msg = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if field.type == FD.TYPE_MESSAGE and depth >= 3:
            continue
        if not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            continue
        if _is_repeated(field):
            for value in draw(st.lists(_value(field, depth), max_size=3)):
                if field.type == FD.TYPE_MESSAGE:
                    getattr(msg, field.name).add().MergeFromString(value)
                else:
                    getattr(msg, field.name).append(value)
        elif field.type == FD.TYPE_MESSAGE:
            getattr(msg, field.name).MergeFromString(draw(_value(field, depth)))
        else:
            setattr(msg, field.name, draw(_value(field, depth)))
    return msg.SerializeToString()


def messages(descriptor: pb_descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[bytes]:
    """Serialized messages of ``descriptor``'s type: any subset of fields set, nested to depth 3."""
    return _message(descriptor, depth)


@st.composite
def mutated(draw: Callable[..., Any], descriptor: pb_descriptor.Descriptor) -> bytes:
    """A serialized message with bytes flipped, cut out or inserted (often no longer valid protobuf)."""
    data = bytearray(draw(messages(descriptor)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if op == "insert" or not data:
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "flip":
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            at = draw(st.integers(0, len(data) - 1))
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _seeds() -> dict[str, list[pb_message.Message]]:
    """One valid request (list) per RPC, by full method name: the starting points of perturbation."""
    pcm, _ = read_wav(read_manifest("jfk")[0]["path"])
    speech = pcm[16000 : 16000 + 2 * 16000]  # 1 s of JFK's voice
    fmt = audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=16000, channels=1)
    recognition = stt_pb2.RecognitionConfig(language="en")
    speech_config = gateway_pb2.TranslateSpeechConfig(
        request_id="f", source_language="en", target_language="fr", input_format=fmt, synthesize_speech=True
    )
    file_config = gateway_pb2.TranslateFileConfig(
        request_id="f", source_language="en", target_language="fr", input_format=fmt
    )
    return {
        "parley.vad.v1.VoiceActivityDetection/Detect": [vad_pb2.DetectRequest(audio=speech, format=fmt)],
        "parley.vad.v1.VoiceActivityDetection/StreamDetect": [
            vad_pb2.StreamDetectRequest(config=vad_pb2.StreamDetectConfig(format=fmt)),
            vad_pb2.StreamDetectRequest(audio=speech),
        ],
        "parley.stt.v1.SpeechToText/Transcribe": [
            stt_pb2.TranscribeRequest(audio=speech, format=fmt, config=recognition)
        ],
        "parley.stt.v1.SpeechToText/StreamingRecognize": [
            stt_pb2.StreamingRecognizeRequest(
                streaming_config=stt_pb2.StreamingRecognitionConfig(format=fmt, config=recognition)
            ),
            stt_pb2.StreamingRecognizeRequest(audio_content=speech),
        ],
        "parley.translate.v1.Translation/Translate": [
            translate_pb2.TranslateRequest(
                texts=["Good morning."], source_language="en", target_language="fr"
            )
        ],
        "parley.translate.v1.Translation/ListLanguagePairs": [translate_pb2.ListLanguagePairsRequest()],
        "parley.tts.v1.SpeechSynthesis/Synthesize": [tts_pb2.SynthesizeRequest(text="Hello.", language="en")],
        "parley.tts.v1.SpeechSynthesis/SynthesizeStream": [
            tts_pb2.SynthesizeRequest(text="Hello. Bye.", language="en")
        ],
        "parley.tts.v1.SpeechSynthesis/ListVoices": [tts_pb2.ListVoicesRequest(language="en")],
        "parley.gateway.v1.Gateway/TranslateSpeech": [
            gateway_pb2.TranslateSpeechRequest(config=speech_config),
            gateway_pb2.TranslateSpeechRequest(audio=speech),
        ],
        "parley.gateway.v1.Gateway/TranslateFile": [
            gateway_pb2.TranslateFileRequest(config=file_config),
            gateway_pb2.TranslateFileRequest(audio=speech),
        ],
    }


def _fields(descriptor: pb_descriptor.Descriptor, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of every non-repeated scalar, enum and bytes field, through nested messages (depth 3)."""
    paths = []
    for field in descriptor.fields:
        if _is_repeated(field):
            continue
        if field.type == FD.TYPE_MESSAGE:
            if len(prefix) < 2:
                paths += _fields(field.message_type, (*prefix, field.name))
        else:
            paths.append((*prefix, field.name))
    return paths


@st.composite
def perturbed(draw: Callable[..., Any], seed: list[pb_message.Message]) -> list[bytes]:
    """The seed request(s) with one to three fields replaced by generated values."""
    out = [m.__deepcopy__() for m in seed]
    for _ in range(draw(st.integers(1, 3))):
        message = out[draw(st.integers(0, len(out) - 1))]
        paths = _fields(message.DESCRIPTOR)
        if not paths:  # a request with no fields (ListLanguagePairs)
            break
        path = draw(st.sampled_from(paths))
        target = message
        for name in path[:-1]:
            target = getattr(target, name)
        field = target.DESCRIPTOR.fields_by_name[path[-1]]
        setattr(target, path[-1], draw(_value(field, 0)))
    return [m.SerializeToString() for m in out]


RPCS = [
    (stage, service.full_name, method)
    for stage, module in (
        ("vad", vad_pb2),
        ("stt", stt_pb2),
        ("translate", translate_pb2),
        ("tts", tts_pb2),
        ("gateway", gateway_pb2),
    )
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]


@pytest.fixture(scope="module")
def seeds() -> dict[str, list[pb_message.Message]]:
    return _seeds()


@pytest.fixture(scope="module")
def servers():
    with futures.ThreadPoolExecutor(4) as pool:
        started = {
            stage: pool.submit(start_server, stage, timeout_s=240)
            for stage in ("vad", "stt", "translate", "tts")
        }
        stages = {stage: f.result() for stage, f in started.items()}
    stages["gateway"] = start_server(
        "gateway", *(arg for stage, p in stages.items() for arg in (f"--{stage}-address", p.address))
    )
    yield stages
    for process in stages.values():
        process.terminate()


def _call(channel: grpc.Channel, service: str, method: pb_descriptor.MethodDescriptor, requests: list[bytes]):
    path = f"/{service}/{method.name}"
    identity = dict(request_serializer=None, response_deserializer=None)
    try:
        if method.client_streaming:
            call = (
                channel.stream_stream(path, **identity)
                if method.server_streaming
                else channel.stream_unary(path, **identity)
            )
            result = call(iter(requests), timeout=CALL_TIMEOUT_S)
        else:
            call = (
                channel.unary_stream(path, **identity)
                if method.server_streaming
                else channel.unary_unary(path, **identity)
            )
            result = call(requests[0], timeout=CALL_TIMEOUT_S)
        if method.server_streaming:
            for _ in result:
                pass
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


@pytest.mark.parametrize(("stage", "service", "method"), RPCS, ids=[f"{s}.{m.name}" for s, _, m in RPCS])
def test_generated_and_mutated_requests_get_documented_statuses(servers, seeds, stage, service, method):
    address = servers[stage].address
    request_type = method.input_type
    one_or_many = st.lists(messages(request_type), min_size=1, max_size=4 if method.client_streaming else 1)
    broken = st.lists(mutated(request_type), min_size=1, max_size=3 if method.client_streaming else 1)
    near_valid = perturbed(seeds[f"{service}/{method.name}"])

    with grpc.insecure_channel(address) as channel:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(requests=near_valid | one_or_many | broken)
        def check(requests: list[bytes]) -> None:
            code, details = _call(channel, service, method, requests)
            assert code in DOCUMENTED, f"{stage} {method.name}: {code.name}: {details}"

        check()
    assert check_health(address) == "SERVING", servers[stage].log()[-3000:]
    assert servers[stage].process.poll() is None
