from parley.audio.v1 import audio_pb2 as _audio_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VadParameters(_message.Message):
    __slots__ = ("threshold", "min_speech_ms", "min_silence_ms", "speech_pad_ms", "max_speech_s", "pause_ms")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_SPEECH_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    SPEECH_PAD_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_SPEECH_S_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    min_speech_ms: int
    min_silence_ms: int
    speech_pad_ms: int
    max_speech_s: float
    pause_ms: int
    def __init__(self, threshold: _Optional[float] = ..., min_speech_ms: _Optional[int] = ..., min_silence_ms: _Optional[int] = ..., speech_pad_ms: _Optional[int] = ..., max_speech_s: _Optional[float] = ..., pause_ms: _Optional[int] = ...) -> None: ...

class SpeechSegment(_message.Message):
    __slots__ = ("start_ms", "end_ms", "confidence")
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    start_ms: int
    end_ms: int
    confidence: float
    def __init__(self, start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., confidence: _Optional[float] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("request_id", "audio", "format", "parameters")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    audio: bytes
    format: _audio_pb2.AudioFormat
    parameters: VadParameters
    def __init__(self, request_id: _Optional[str] = ..., audio: _Optional[bytes] = ..., format: _Optional[_Union[_audio_pb2.AudioFormat, _Mapping]] = ..., parameters: _Optional[_Union[VadParameters, _Mapping]] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("request_id", "segments", "duration_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    segments: _containers.RepeatedCompositeFieldContainer[SpeechSegment]
    duration_s: float
    def __init__(self, request_id: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[SpeechSegment, _Mapping]]] = ..., duration_s: _Optional[float] = ...) -> None: ...

class StreamDetectConfig(_message.Message):
    __slots__ = ("request_id", "format", "parameters")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    format: _audio_pb2.AudioFormat
    parameters: VadParameters
    def __init__(self, request_id: _Optional[str] = ..., format: _Optional[_Union[_audio_pb2.AudioFormat, _Mapping]] = ..., parameters: _Optional[_Union[VadParameters, _Mapping]] = ...) -> None: ...

class StreamDetectRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: StreamDetectConfig
    audio: bytes
    def __init__(self, config: _Optional[_Union[StreamDetectConfig, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class SpeechStarted(_message.Message):
    __slots__ = ("start_ms",)
    START_MS_FIELD_NUMBER: _ClassVar[int]
    start_ms: int
    def __init__(self, start_ms: _Optional[int] = ...) -> None: ...

class SpeechPaused(_message.Message):
    __slots__ = ("start_ms", "end_ms")
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    start_ms: int
    end_ms: int
    def __init__(self, start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ...) -> None: ...

class SpeechEnded(_message.Message):
    __slots__ = ("segment",)
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    segment: SpeechSegment
    def __init__(self, segment: _Optional[_Union[SpeechSegment, _Mapping]] = ...) -> None: ...

class StreamDetectResponse(_message.Message):
    __slots__ = ("request_id", "speech_started", "speech_ended", "speech_paused", "audio_processed_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPEECH_STARTED_FIELD_NUMBER: _ClassVar[int]
    SPEECH_ENDED_FIELD_NUMBER: _ClassVar[int]
    SPEECH_PAUSED_FIELD_NUMBER: _ClassVar[int]
    AUDIO_PROCESSED_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    speech_started: SpeechStarted
    speech_ended: SpeechEnded
    speech_paused: SpeechPaused
    audio_processed_ms: int
    def __init__(self, request_id: _Optional[str] = ..., speech_started: _Optional[_Union[SpeechStarted, _Mapping]] = ..., speech_ended: _Optional[_Union[SpeechEnded, _Mapping]] = ..., speech_paused: _Optional[_Union[SpeechPaused, _Mapping]] = ..., audio_processed_ms: _Optional[int] = ...) -> None: ...
