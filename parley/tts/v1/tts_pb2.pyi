from parley.audio.v1 import audio_pb2 as _audio_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SynthesizeRequest(_message.Message):
    __slots__ = ("request_id", "text", "language", "voice", "speaking_rate", "sample_rate_hz")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    SPEAKING_RATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    language: str
    voice: str
    speaking_rate: float
    sample_rate_hz: int
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., language: _Optional[str] = ..., voice: _Optional[str] = ..., speaking_rate: _Optional[float] = ..., sample_rate_hz: _Optional[int] = ...) -> None: ...

class SynthesizeResponse(_message.Message):
    __slots__ = ("request_id", "audio", "format", "duration_s", "voice")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    audio: bytes
    format: _audio_pb2.AudioFormat
    duration_s: float
    voice: str
    def __init__(self, request_id: _Optional[str] = ..., audio: _Optional[bytes] = ..., format: _Optional[_Union[_audio_pb2.AudioFormat, _Mapping]] = ..., duration_s: _Optional[float] = ..., voice: _Optional[str] = ...) -> None: ...

class SynthesizeStreamResponse(_message.Message):
    __slots__ = ("request_id", "audio", "format", "sentence_index", "sentence", "duration_s", "is_last", "voice")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SENTENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SENTENCE_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    IS_LAST_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    audio: bytes
    format: _audio_pb2.AudioFormat
    sentence_index: int
    sentence: str
    duration_s: float
    is_last: bool
    voice: str
    def __init__(self, request_id: _Optional[str] = ..., audio: _Optional[bytes] = ..., format: _Optional[_Union[_audio_pb2.AudioFormat, _Mapping]] = ..., sentence_index: _Optional[int] = ..., sentence: _Optional[str] = ..., duration_s: _Optional[float] = ..., is_last: _Optional[bool] = ..., voice: _Optional[str] = ...) -> None: ...

class ListVoicesRequest(_message.Message):
    __slots__ = ("language",)
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    language: str
    def __init__(self, language: _Optional[str] = ...) -> None: ...

class Voice(_message.Message):
    __slots__ = ("name", "language", "backend", "sample_rate_hz")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    name: str
    language: str
    backend: str
    sample_rate_hz: int
    def __init__(self, name: _Optional[str] = ..., language: _Optional[str] = ..., backend: _Optional[str] = ..., sample_rate_hz: _Optional[int] = ...) -> None: ...

class ListVoicesResponse(_message.Message):
    __slots__ = ("voices",)
    VOICES_FIELD_NUMBER: _ClassVar[int]
    voices: _containers.RepeatedCompositeFieldContainer[Voice]
    def __init__(self, voices: _Optional[_Iterable[_Union[Voice, _Mapping]]] = ...) -> None: ...
