"""Configuration of the translation server."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.batching import BatchingConfig
from services.common.config import ServerConfig, option


class Backend(enum.Enum):
    """Which engine translates."""

    CTRANSLATE2 = "ctranslate2"
    LLM = "llm"


class LlmTransport(enum.Enum):
    """How the ``llm`` backend reaches its language model."""

    EMBEDDED = "embedded"
    HTTP = "http"


@dataclass(frozen=True)
class TranslateConfig(BatchingConfig, ServerConfig):
    """Translation server: CTranslate2 (NLLB-200, M2M100, Marian/OPUS-MT) or a language model.

    The default is the ``llm`` backend with the bundled Gemma 3 270M run in-process by llama.cpp, which
    needs no GPU and no download. For production quality use ``--backend ctranslate2 --model-path DIR``
    with a converted NLLB-200 or OPUS-MT model, or ``--llm-transport http`` against a vLLM or llama.cpp
    server on a GPU host.

    Sentences of concurrent requests go through one dynamic batcher (:class:`BatchingConfig`): the batch
    items are sentences, a batch holds one language pair, and a request's ``priority`` (1 highest) picks
    the queue level (``priority - 1``; 0 = the server default, the lowest level).
    """

    max_batch_size: int = option(
        32,
        "Most sentences per model batch (the batcher's batch and CTranslate2's max_batch_size); the llm "
        "embedded backend decodes them together, one llama.cpp sequence each.",
    )
    max_queue_size: int = option(
        1024,
        "Sentences that may wait in the queue; when full, requests fail RESOURCE_EXHAUSTED. 0 = unbounded.",
    )
    priority_levels: int = option(
        3, "Request priorities accepted: 1..priority_levels (1 served first); 0 means the lowest."
    )
    instance_count: int = option(
        0,
        "Batcher model instances; 0: as many as the backend runs at once (ctranslate2: inter_threads x "
        "replicas; llm embedded: llm_instances; llm http: 2).",
    )

    backend: Backend = option(Backend.LLM, "Engine: ctranslate2 or llm.")
    model_name: str = option("", "Model name reported in responses; empty: the model directory or file name.")
    max_texts: int = option(64, "Most texts one Translate request may carry.")
    max_chars: int = option(10000, "Most characters (all texts together) one Translate request may carry.")
    max_sentence_chars: int = option(
        600, "Longer sentences are cut at white space into pieces of at most this many characters."
    )
    # ctranslate2
    model_path: str = option("", "ctranslate2: CTranslate2 model directory, with its SentencePiece model(s).")
    device: str = option("cpu", "ctranslate2: cpu, cuda or auto.")
    device_index: tuple[int, ...] = option((0,), "ctranslate2: CUDA device index(es), one replica per index.")
    compute_type: str = option("default", "ctranslate2: compute type (default, auto, int8, float16, ...).")
    inter_threads: int = option(1, "ctranslate2: batches translated at once (per device).")
    intra_threads: int = option(0, "ctranslate2: threads per batch on CPU; 0 lets CTranslate2 choose.")
    beam_size: int = option(2, "ctranslate2: beam width; 1 is greedy search.")
    max_decoding_length: int = option(256, "ctranslate2: most tokens generated per sentence.")
    source_language: str = option("", "ctranslate2: source language (BCP-47) of a single-pair Marian model.")
    target_language: str = option("", "ctranslate2: target language (BCP-47) of a single-pair Marian model.")
    # llm
    llm_transport: LlmTransport = option(
        LlmTransport.EMBEDDED, "llm: embedded (llama.cpp in-process) or http."
    )
    llm_languages: tuple[str, ...] = option(
        ("en", "fr", "tr", "de", "es", "it", "pt"),
        "llm: languages offered (every ordered pair among them); each needs few-shot examples in the prompt.",
    )
    llm_max_tokens: int = option(256, "llm: most tokens generated per sentence.")
    llm_model_path: str = option("", "llm embedded: GGUF file; empty: the bundled Gemma 3 270M Q4_K_M.")
    llm_context_tokens: int = option(
        4096,
        "llm embedded: KV cache of one model instance, in tokens, shared by the sentences of a batch: the "
        "few-shot prompt once, then per sentence its prompt and generation budget (a sentence waits while "
        "the others hold the room). Checked at start: at least the longest few-shot prompt plus "
        "llm_max_tokens.",
    )
    llm_threads: int = option(0, "llm embedded: CPU threads per model instance; 0: all cores.")
    llm_instances: int = option(1, "llm embedded: model instances (each used by one thread at a time).")
    llm_base_url: str = option(
        "http://127.0.0.1:8000/v1", "llm http: OpenAI-compatible base URL (vLLM, llama.cpp)."
    )
    llm_model: str = option("", "llm http: model name sent to the endpoint.")
    llm_api_key_env: str = option("PARLEY_LLM_API_KEY", "llm http: environment variable holding the API key.")
    llm_timeout_s: float = option(30.0, "llm http: timeout of one HTTP call, in seconds; 0 for none.")
    llm_concurrency: int = option(
        8, "llm http: HTTP calls in flight at once (sentences are sent in parallel)."
    )
