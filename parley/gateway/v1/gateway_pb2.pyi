from parley.audio.v1 import audio_pb2 as _audio_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TranslationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSLATION_MODE_UNSPECIFIED: _ClassVar[TranslationMode]
    CASCADE: _ClassVar[TranslationMode]
    DIRECT: _ClassVar[TranslationMode]
TRANSLATION_MODE_UNSPECIFIED: TranslationMode
CASCADE: TranslationMode
DIRECT: TranslationMode

class TranslateSpeechConfig(_message.Message):
    __slots__ = ("request_id", "source_language", "target_language", "input_format", "synthesize_speech", "voice", "output_sample_rate_hz", "interim_results", "mode")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    SYNTHESIZE_SPEECH_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    INTERIM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    source_language: str
    target_language: str
    input_format: _audio_pb2.AudioFormat
    synthesize_speech: bool
    voice: str
    output_sample_rate_hz: int
    interim_results: bool
    mode: TranslationMode
    def __init__(self, request_id: _Optional[str] = ..., source_language: _Optional[str] = ..., target_language: _Optional[str] = ..., input_format: _Optional[_Union[_audio_pb2.AudioFormat, _Mapping]] = ..., synthesize_speech: _Optional[bool] = ..., voice: _Optional[str] = ..., output_sample_rate_hz: _Optional[int] = ..., interim_results: _Optional[bool] = ..., mode: _Optional[_Union[TranslationMode, str]] = ...) -> None: ...

class TranslateSpeechRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: TranslateSpeechConfig
    audio: bytes
    def __init__(self, config: _Optional[_Union[TranslateSpeechConfig, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class SpeechStarted(_message.Message):
    __slots__ = ("start_ms",)
    START_MS_FIELD_NUMBER: _ClassVar[int]
    start_ms: int
    def __init__(self, start_ms: _Optional[int] = ...) -> None: ...

class Transcript(_message.Message):
    __slots__ = ("text", "is_final", "stability", "start_ms", "end_ms", "language")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    STABILITY_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    is_final: bool
    stability: float
    start_ms: int
    end_ms: int
    language: str
    def __init__(self, text: _Optional[str] = ..., is_final: _Optional[bool] = ..., stability: _Optional[float] = ..., start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., language: _Optional[str] = ...) -> None: ...

class Word(_message.Message):
    __slots__ = ("word", "start_ms", "end_ms", "probability")
    WORD_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    word: str
    start_ms: int
    end_ms: int
    probability: float
    def __init__(self, word: _Optional[str] = ..., start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class TranscriptCommit(_message.Message):
    __slots__ = ("text", "start_ms", "end_ms", "words", "clause_index", "closes_clause")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    CLAUSE_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLOSES_CLAUSE_FIELD_NUMBER: _ClassVar[int]
    text: str
    start_ms: int
    end_ms: int
    words: _containers.RepeatedCompositeFieldContainer[Word]
    clause_index: int
    closes_clause: bool
    def __init__(self, text: _Optional[str] = ..., start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., words: _Optional[_Iterable[_Union[Word, _Mapping]]] = ..., clause_index: _Optional[int] = ..., closes_clause: _Optional[bool] = ...) -> None: ...

class Translation(_message.Message):
    __slots__ = ("text", "source_language", "target_language", "clause_index")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    CLAUSE_INDEX_FIELD_NUMBER: _ClassVar[int]
    text: str
    source_language: str
    target_language: str
    clause_index: int
    def __init__(self, text: _Optional[str] = ..., source_language: _Optional[str] = ..., target_language: _Optional[str] = ..., clause_index: _Optional[int] = ...) -> None: ...

class SynthesizedAudio(_message.Message):
    __slots__ = ("audio", "format", "sentence_index", "is_last", "clause_index")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SENTENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    IS_LAST_FIELD_NUMBER: _ClassVar[int]
    CLAUSE_INDEX_FIELD_NUMBER: _ClassVar[int]
    audio: bytes
    format: _audio_pb2.AudioFormat
    sentence_index: int
    is_last: bool
    clause_index: int
    def __init__(self, audio: _Optional[bytes] = ..., format: _Optional[_Union[_audio_pb2.AudioFormat, _Mapping]] = ..., sentence_index: _Optional[int] = ..., is_last: _Optional[bool] = ..., clause_index: _Optional[int] = ...) -> None: ...

class ClauseTimings(_message.Message):
    __slots__ = ("clause_index", "end_ms", "end_of_speech_to_commit_ms", "end_of_speech_to_translation_ms", "end_of_speech_to_first_audio_ms", "translation_ms", "tts_first_audio_ms")
    CLAUSE_INDEX_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    END_OF_SPEECH_TO_COMMIT_MS_FIELD_NUMBER: _ClassVar[int]
    END_OF_SPEECH_TO_TRANSLATION_MS_FIELD_NUMBER: _ClassVar[int]
    END_OF_SPEECH_TO_FIRST_AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSLATION_MS_FIELD_NUMBER: _ClassVar[int]
    TTS_FIRST_AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    clause_index: int
    end_ms: int
    end_of_speech_to_commit_ms: float
    end_of_speech_to_translation_ms: float
    end_of_speech_to_first_audio_ms: float
    translation_ms: float
    tts_first_audio_ms: float
    def __init__(self, clause_index: _Optional[int] = ..., end_ms: _Optional[int] = ..., end_of_speech_to_commit_ms: _Optional[float] = ..., end_of_speech_to_translation_ms: _Optional[float] = ..., end_of_speech_to_first_audio_ms: _Optional[float] = ..., translation_ms: _Optional[float] = ..., tts_first_audio_ms: _Optional[float] = ...) -> None: ...

class UtteranceTimings(_message.Message):
    __slots__ = ("end_of_speech_to_transcript_ms", "end_of_speech_to_translation_ms", "end_of_speech_to_first_audio_ms", "stt_ms", "translation_ms", "tts_first_audio_ms", "tts_ms", "clauses")
    END_OF_SPEECH_TO_TRANSCRIPT_MS_FIELD_NUMBER: _ClassVar[int]
    END_OF_SPEECH_TO_TRANSLATION_MS_FIELD_NUMBER: _ClassVar[int]
    END_OF_SPEECH_TO_FIRST_AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    STT_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSLATION_MS_FIELD_NUMBER: _ClassVar[int]
    TTS_FIRST_AUDIO_MS_FIELD_NUMBER: _ClassVar[int]
    TTS_MS_FIELD_NUMBER: _ClassVar[int]
    CLAUSES_FIELD_NUMBER: _ClassVar[int]
    end_of_speech_to_transcript_ms: float
    end_of_speech_to_translation_ms: float
    end_of_speech_to_first_audio_ms: float
    stt_ms: float
    translation_ms: float
    tts_first_audio_ms: float
    tts_ms: float
    clauses: int
    def __init__(self, end_of_speech_to_transcript_ms: _Optional[float] = ..., end_of_speech_to_translation_ms: _Optional[float] = ..., end_of_speech_to_first_audio_ms: _Optional[float] = ..., stt_ms: _Optional[float] = ..., translation_ms: _Optional[float] = ..., tts_first_audio_ms: _Optional[float] = ..., tts_ms: _Optional[float] = ..., clauses: _Optional[int] = ...) -> None: ...

class UtteranceError(_message.Message):
    __slots__ = ("stage", "code", "message")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stage: str
    code: int
    message: str
    def __init__(self, stage: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EndOfStream(_message.Message):
    __slots__ = ("utterances", "audio_duration_s")
    UTTERANCES_FIELD_NUMBER: _ClassVar[int]
    AUDIO_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    utterances: int
    audio_duration_s: float
    def __init__(self, utterances: _Optional[int] = ..., audio_duration_s: _Optional[float] = ...) -> None: ...

class TranslateSpeechResponse(_message.Message):
    __slots__ = ("request_id", "utterance_index", "speech_started", "transcript", "translation", "audio", "timings", "error", "end_of_stream", "commit", "clause_timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SPEECH_STARTED_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    TRANSLATION_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    END_OF_STREAM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    CLAUSE_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    utterance_index: int
    speech_started: SpeechStarted
    transcript: Transcript
    translation: Translation
    audio: SynthesizedAudio
    timings: UtteranceTimings
    error: UtteranceError
    end_of_stream: EndOfStream
    commit: TranscriptCommit
    clause_timings: ClauseTimings
    def __init__(self, request_id: _Optional[str] = ..., utterance_index: _Optional[int] = ..., speech_started: _Optional[_Union[SpeechStarted, _Mapping]] = ..., transcript: _Optional[_Union[Transcript, _Mapping]] = ..., translation: _Optional[_Union[Translation, _Mapping]] = ..., audio: _Optional[_Union[SynthesizedAudio, _Mapping]] = ..., timings: _Optional[_Union[UtteranceTimings, _Mapping]] = ..., error: _Optional[_Union[UtteranceError, _Mapping]] = ..., end_of_stream: _Optional[_Union[EndOfStream, _Mapping]] = ..., commit: _Optional[_Union[TranscriptCommit, _Mapping]] = ..., clause_timings: _Optional[_Union[ClauseTimings, _Mapping]] = ...) -> None: ...

class TranslateFileConfig(_message.Message):
    __slots__ = ("request_id", "source_language", "target_language", "input_format", "beam_size")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    source_language: str
    target_language: str
    input_format: _audio_pb2.AudioFormat
    beam_size: int
    def __init__(self, request_id: _Optional[str] = ..., source_language: _Optional[str] = ..., target_language: _Optional[str] = ..., input_format: _Optional[_Union[_audio_pb2.AudioFormat, _Mapping]] = ..., beam_size: _Optional[int] = ...) -> None: ...

class TranslateFileRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: TranslateFileConfig
    audio: bytes
    def __init__(self, config: _Optional[_Union[TranslateFileConfig, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class CueQuality(_message.Message):
    __slots__ = ("chars_per_second", "max_line_chars", "violations", "repeated_ngrams", "avg_logprob", "no_speech_prob", "min_word_probability", "low_confidence", "length_ratio")
    CHARS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MAX_LINE_CHARS_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    REPEATED_NGRAMS_FIELD_NUMBER: _ClassVar[int]
    AVG_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NO_SPEECH_PROB_FIELD_NUMBER: _ClassVar[int]
    MIN_WORD_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOW_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_RATIO_FIELD_NUMBER: _ClassVar[int]
    chars_per_second: float
    max_line_chars: int
    violations: _containers.RepeatedScalarFieldContainer[str]
    repeated_ngrams: _containers.RepeatedScalarFieldContainer[str]
    avg_logprob: float
    no_speech_prob: float
    min_word_probability: float
    low_confidence: bool
    length_ratio: float
    def __init__(self, chars_per_second: _Optional[float] = ..., max_line_chars: _Optional[int] = ..., violations: _Optional[_Iterable[str]] = ..., repeated_ngrams: _Optional[_Iterable[str]] = ..., avg_logprob: _Optional[float] = ..., no_speech_prob: _Optional[float] = ..., min_word_probability: _Optional[float] = ..., low_confidence: _Optional[bool] = ..., length_ratio: _Optional[float] = ...) -> None: ...

class SubtitleCue(_message.Message):
    __slots__ = ("start_ms", "end_ms", "lines", "utterance_index", "quality")
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    start_ms: int
    end_ms: int
    lines: _containers.RepeatedScalarFieldContainer[str]
    utterance_index: int
    quality: CueQuality
    def __init__(self, start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., lines: _Optional[_Iterable[str]] = ..., utterance_index: _Optional[int] = ..., quality: _Optional[_Union[CueQuality, _Mapping]] = ...) -> None: ...

class FilteredSegment(_message.Message):
    __slots__ = ("start_ms", "end_ms", "text", "avg_logprob", "no_speech_prob", "compression_ratio")
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    AVG_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NO_SPEECH_PROB_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    start_ms: int
    end_ms: int
    text: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    def __init__(self, start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., text: _Optional[str] = ..., avg_logprob: _Optional[float] = ..., no_speech_prob: _Optional[float] = ..., compression_ratio: _Optional[float] = ...) -> None: ...

class TrackQuality(_message.Message):
    __slots__ = ("language", "violations", "repetition_cues", "low_confidence_cues", "dropped_segments", "length_ratio", "length_ratio_outliers", "max_chars_per_second")
    class ViolationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_CUES_FIELD_NUMBER: _ClassVar[int]
    LOW_CONFIDENCE_CUES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_RATIO_FIELD_NUMBER: _ClassVar[int]
    LENGTH_RATIO_OUTLIERS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHARS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    language: str
    violations: _containers.ScalarMap[str, int]
    repetition_cues: int
    low_confidence_cues: int
    dropped_segments: _containers.RepeatedCompositeFieldContainer[FilteredSegment]
    length_ratio: float
    length_ratio_outliers: int
    max_chars_per_second: float
    def __init__(self, language: _Optional[str] = ..., violations: _Optional[_Mapping[str, int]] = ..., repetition_cues: _Optional[int] = ..., low_confidence_cues: _Optional[int] = ..., dropped_segments: _Optional[_Iterable[_Union[FilteredSegment, _Mapping]]] = ..., length_ratio: _Optional[float] = ..., length_ratio_outliers: _Optional[int] = ..., max_chars_per_second: _Optional[float] = ...) -> None: ...

class FileTimings(_message.Message):
    __slots__ = ("vad_ms", "stt_ms", "translation_ms", "total_ms")
    VAD_MS_FIELD_NUMBER: _ClassVar[int]
    STT_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSLATION_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    vad_ms: float
    stt_ms: float
    translation_ms: float
    total_ms: float
    def __init__(self, vad_ms: _Optional[float] = ..., stt_ms: _Optional[float] = ..., translation_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class TranslateFileProgress(_message.Message):
    __slots__ = ("stage", "audio_processed_s", "audio_duration_s")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_PROCESSED_S_FIELD_NUMBER: _ClassVar[int]
    AUDIO_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    stage: str
    audio_processed_s: float
    audio_duration_s: float
    def __init__(self, stage: _Optional[str] = ..., audio_processed_s: _Optional[float] = ..., audio_duration_s: _Optional[float] = ...) -> None: ...

class TranslateFileResult(_message.Message):
    __slots__ = ("source_language", "target_language", "audio_duration_s", "speech_duration_s", "source_cues", "target_cues", "source_quality", "target_quality", "timings", "translation_model")
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    SPEECH_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    SOURCE_CUES_FIELD_NUMBER: _ClassVar[int]
    TARGET_CUES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_QUALITY_FIELD_NUMBER: _ClassVar[int]
    TARGET_QUALITY_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TRANSLATION_MODEL_FIELD_NUMBER: _ClassVar[int]
    source_language: str
    target_language: str
    audio_duration_s: float
    speech_duration_s: float
    source_cues: _containers.RepeatedCompositeFieldContainer[SubtitleCue]
    target_cues: _containers.RepeatedCompositeFieldContainer[SubtitleCue]
    source_quality: TrackQuality
    target_quality: TrackQuality
    timings: FileTimings
    translation_model: str
    def __init__(self, source_language: _Optional[str] = ..., target_language: _Optional[str] = ..., audio_duration_s: _Optional[float] = ..., speech_duration_s: _Optional[float] = ..., source_cues: _Optional[_Iterable[_Union[SubtitleCue, _Mapping]]] = ..., target_cues: _Optional[_Iterable[_Union[SubtitleCue, _Mapping]]] = ..., source_quality: _Optional[_Union[TrackQuality, _Mapping]] = ..., target_quality: _Optional[_Union[TrackQuality, _Mapping]] = ..., timings: _Optional[_Union[FileTimings, _Mapping]] = ..., translation_model: _Optional[str] = ...) -> None: ...

class TranslateFileResponse(_message.Message):
    __slots__ = ("request_id", "progress", "result")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    progress: TranslateFileProgress
    result: TranslateFileResult
    def __init__(self, request_id: _Optional[str] = ..., progress: _Optional[_Union[TranslateFileProgress, _Mapping]] = ..., result: _Optional[_Union[TranslateFileResult, _Mapping]] = ...) -> None: ...
