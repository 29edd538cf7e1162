from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TranslateRequest(_message.Message):
    __slots__ = ("request_id", "texts", "source_language", "target_language", "priority", "context")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    source_language: str
    target_language: str
    priority: int
    context: TranslationContext
    def __init__(self, request_id: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., source_language: _Optional[str] = ..., target_language: _Optional[str] = ..., priority: _Optional[int] = ..., context: _Optional[_Union[TranslationContext, _Mapping]] = ...) -> None: ...

class TranslationContext(_message.Message):
    __slots__ = ("source_text", "translated_text")
    SOURCE_TEXT_FIELD_NUMBER: _ClassVar[int]
    TRANSLATED_TEXT_FIELD_NUMBER: _ClassVar[int]
    source_text: str
    translated_text: str
    def __init__(self, source_text: _Optional[str] = ..., translated_text: _Optional[str] = ...) -> None: ...

class TranslateResponse(_message.Message):
    __slots__ = ("request_id", "translations", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSLATIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    translations: _containers.RepeatedScalarFieldContainer[str]
    model: str
    def __init__(self, request_id: _Optional[str] = ..., translations: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ...) -> None: ...

class ListLanguagePairsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LanguagePair(_message.Message):
    __slots__ = ("source_language", "target_language")
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    source_language: str
    target_language: str
    def __init__(self, source_language: _Optional[str] = ..., target_language: _Optional[str] = ...) -> None: ...

class ListLanguagePairsResponse(_message.Message):
    __slots__ = ("pairs", "model")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[LanguagePair]
    model: str
    def __init__(self, pairs: _Optional[_Iterable[_Union[LanguagePair, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...
