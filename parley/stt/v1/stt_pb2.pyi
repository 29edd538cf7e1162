from parley.audio.v1 import audio_pb2 as _audio_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TRANSCRIBE: _ClassVar[Task]
    TRANSLATE: _ClassVar[Task]

class CommitPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMIT_POLICY_UNSPECIFIED: _ClassVar[CommitPolicy]
    LOCAL_AGREEMENT: _ClassVar[CommitPolicy]
    UTTERANCE: _ClassVar[CommitPolicy]
TASK_UNSPECIFIED: Task
TRANSCRIBE: Task
TRANSLATE: Task
COMMIT_POLICY_UNSPECIFIED: CommitPolicy
LOCAL_AGREEMENT: CommitPolicy
UTTERANCE: CommitPolicy

class RecognitionConfig(_message.Message):
    __slots__ = ("language", "beam_size", "word_timestamps", "initial_prompt", "hotwords", "vad_filter", "task", "priority")
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    WORD_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PROMPT_FIELD_NUMBER: _ClassVar[int]
    HOTWORDS_FIELD_NUMBER: _ClassVar[int]
    VAD_FILTER_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    language: str
    beam_size: int
    word_timestamps: bool
    initial_prompt: str
    hotwords: str
    vad_filter: bool
    task: Task
    priority: int
    def __init__(self, language: _Optional[str] = ..., beam_size: _Optional[int] = ..., word_timestamps: _Optional[bool] = ..., initial_prompt: _Optional[str] = ..., hotwords: _Optional[str] = ..., vad_filter: _Optional[bool] = ..., task: _Optional[_Union[Task, str]] = ..., priority: _Optional[int] = ...) -> None: ...

class TranscribeRequest(_message.Message):
    __slots__ = ("request_id", "audio", "format", "config")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    audio: bytes
    format: _audio_pb2.AudioFormat
    config: RecognitionConfig
    def __init__(self, request_id: _Optional[str] = ..., audio: _Optional[bytes] = ..., format: _Optional[_Union[_audio_pb2.AudioFormat, _Mapping]] = ..., config: _Optional[_Union[RecognitionConfig, _Mapping]] = ...) -> None: ...

class Word(_message.Message):
    __slots__ = ("start_ms", "end_ms", "word", "probability")
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    WORD_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    start_ms: int
    end_ms: int
    word: str
    probability: float
    def __init__(self, start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., word: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("start_ms", "end_ms", "text", "avg_logprob", "no_speech_prob", "compression_ratio", "words")
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    AVG_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NO_SPEECH_PROB_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    start_ms: int
    end_ms: int
    text: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    words: _containers.RepeatedCompositeFieldContainer[Word]
    def __init__(self, start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., text: _Optional[str] = ..., avg_logprob: _Optional[float] = ..., no_speech_prob: _Optional[float] = ..., compression_ratio: _Optional[float] = ..., words: _Optional[_Iterable[_Union[Word, _Mapping]]] = ...) -> None: ...

class TranscribeResponse(_message.Message):
    __slots__ = ("request_id", "text", "language", "language_probability", "duration_s", "segments", "dropped_segments")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    language: str
    language_probability: float
    duration_s: float
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    dropped_segments: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., language: _Optional[str] = ..., language_probability: _Optional[float] = ..., duration_s: _Optional[float] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., dropped_segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

class StreamingRecognitionConfig(_message.Message):
    __slots__ = ("request_id", "format", "config", "interim_results", "commit_policy", "caller_endpointing")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    INTERIM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_POLICY_FIELD_NUMBER: _ClassVar[int]
    CALLER_ENDPOINTING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    format: _audio_pb2.AudioFormat
    config: RecognitionConfig
    interim_results: bool
    commit_policy: CommitPolicy
    caller_endpointing: bool
    def __init__(self, request_id: _Optional[str] = ..., format: _Optional[_Union[_audio_pb2.AudioFormat, _Mapping]] = ..., config: _Optional[_Union[RecognitionConfig, _Mapping]] = ..., interim_results: _Optional[bool] = ..., commit_policy: _Optional[_Union[CommitPolicy, str]] = ..., caller_endpointing: _Optional[bool] = ...) -> None: ...

class SpeechBoundary(_message.Message):
    __slots__ = ("kind", "at_ms")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[SpeechBoundary.Kind]
        START: _ClassVar[SpeechBoundary.Kind]
        PAUSE: _ClassVar[SpeechBoundary.Kind]
        END: _ClassVar[SpeechBoundary.Kind]
    KIND_UNSPECIFIED: SpeechBoundary.Kind
    START: SpeechBoundary.Kind
    PAUSE: SpeechBoundary.Kind
    END: SpeechBoundary.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    kind: SpeechBoundary.Kind
    at_ms: int
    def __init__(self, kind: _Optional[_Union[SpeechBoundary.Kind, str]] = ..., at_ms: _Optional[int] = ...) -> None: ...

class StreamingRecognizeRequest(_message.Message):
    __slots__ = ("streaming_config", "audio_content", "boundary")
    STREAMING_CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CONTENT_FIELD_NUMBER: _ClassVar[int]
    BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    streaming_config: StreamingRecognitionConfig
    audio_content: bytes
    boundary: SpeechBoundary
    def __init__(self, streaming_config: _Optional[_Union[StreamingRecognitionConfig, _Mapping]] = ..., audio_content: _Optional[bytes] = ..., boundary: _Optional[_Union[SpeechBoundary, _Mapping]] = ...) -> None: ...

class StreamingRecognitionResult(_message.Message):
    __slots__ = ("transcript", "is_final", "stability", "utterance_index", "start_ms", "end_ms", "language", "segments", "committed", "closes_clause", "commit_index")
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    STABILITY_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    CLOSES_CLAUSE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    transcript: str
    is_final: bool
    stability: float
    utterance_index: int
    start_ms: int
    end_ms: int
    language: str
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    committed: Segment
    closes_clause: bool
    commit_index: int
    def __init__(self, transcript: _Optional[str] = ..., is_final: _Optional[bool] = ..., stability: _Optional[float] = ..., utterance_index: _Optional[int] = ..., start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., language: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., committed: _Optional[_Union[Segment, _Mapping]] = ..., closes_clause: _Optional[bool] = ..., commit_index: _Optional[int] = ...) -> None: ...

class StreamingRecognizeResponse(_message.Message):
    __slots__ = ("request_id", "results", "audio_processed_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_PROCESSED_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[StreamingRecognitionResult]
    audio_processed_s: float
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[StreamingRecognitionResult, _Mapping]]] = ..., audio_processed_s: _Optional[float] = ...) -> None: ...
