"""Gateway settings: where the stages listen and how to reach them, stream limits, the resilience policy."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.config import DEFAULT_PORTS, ServerConfig, StreamLimitsConfig, option


class CommitPolicy(enum.Enum):
    """When the live path commits words (``--live-commit-policy``)."""

    LOCAL_AGREEMENT = "local_agreement"
    UTTERANCE = "utterance"


@dataclass(frozen=True)
class GatewayConfig(StreamLimitsConfig, ServerConfig):
    """Gateway: live speech translation across the VAD, STT, translation and TTS services.

    Both RPCs read a client stream: each is bounded by ``stream_idle_timeout_s`` and
    ``max_stream_duration_s`` (:class:`StreamLimitsConfig`); TranslateSpeech by ``max_streams`` and
    ``max_streams_per_caller``, TranslateFile by ``max_file_jobs`` and ``max_file_s``.

    Stage addresses are gRPC targets: ``host:port``, or ``dns:///stt:50053`` to spread calls round-robin
    over every replica the name resolves to (Compose ``--scale``, a headless Kubernetes Service).
    """

    vad_address: str = option(f"127.0.0.1:{DEFAULT_PORTS['vad']}", "host:port of the VAD server.")
    stt_address: str = option(f"127.0.0.1:{DEFAULT_PORTS['stt']}", "host:port of the speech-to-text server.")
    translate_address: str = option(
        f"127.0.0.1:{DEFAULT_PORTS['translate']}", "host:port of the translation server."
    )
    tts_address: str = option(f"127.0.0.1:{DEFAULT_PORTS['tts']}", "host:port of the text-to-speech server.")
    stage_tls_ca_file: str = option(
        "", "PEM CA bundle that verifies the stage servers; set: TLS to the stages. Empty: plaintext."
    )
    stage_tls_cert_file: str = option(
        "", "PEM client certificate chain presented to the stages (their --tls-client-ca-file: mutual TLS)."
    )
    stage_tls_key_file: str = option("", "PEM private key of --stage-tls-cert-file (unencrypted).")
    stage_tls_server_name: str = option(
        "", "Name checked against every stage's certificate instead of its address's host; empty: the host."
    )
    max_streams: int = option(16, "Concurrent TranslateSpeech streams; past it, RESOURCE_EXHAUSTED at once.")
    max_streams_per_caller: int = option(
        4,
        "Concurrent TranslateSpeech streams of one caller (the peer address's host: callers behind one proxy "
        "or NAT share it); past it, RESOURCE_EXHAUSTED at once; 0 for no per-caller limit.",
    )
    max_file_jobs: int = option(
        2,
        "Concurrent TranslateFile calls (each holds its whole recording, 16 kHz 16-bit: 115 MB an hour); "
        "past it, RESOURCE_EXHAUSTED at once.",
    )
    max_file_s: float = option(
        3 * 3600.0,
        "Longest recording TranslateFile accepts, in seconds (default 3 h); past it, INVALID_ARGUMENT.",
    )
    catalog_ttl_s: float = option(
        60.0,
        "How long the voices (TTS ListVoices) and language pairs (ListLanguagePairs) that a stream's config "
        "is checked against are cached, in seconds.",
    )
    max_buffer_s: float = option(60.0, "Audio kept per stream to cut utterances from, in seconds.")
    max_pending_utterances: int = option(
        4, "Utterances per stream detected but not yet sent back; past it, audio intake waits (backpressure)."
    )
    max_utterance_s: float = option(
        30.0,
        "Longest clause held in the buffer for DIRECT translation, in seconds: the VAD server's "
        "--max-speech-s (30 s), which splits longer speech.",
    )
    direct_to_english: bool = option(
        False,
        "Default mode (TRANSLATION_MODE_UNSPECIFIED) into English: Whisper's own translate task (DIRECT) "
        "instead of STT + translation (CASCADE). Other targets always use CASCADE. Off: on 2 CPU cores the "
        "live path's fr->en end of speech to audio was p50 2.65 s in CASCADE against 5.95 s in DIRECT "
        "(make bench, FLEURS fr), since DIRECT adds a Whisper decode per clause to the stream's own.",
    )
    live_commit_policy: CommitPolicy = option(
        CommitPolicy.LOCAL_AGREEMENT,
        "local_agreement: words are committed while the speaker talks (LocalAgreement-2 and VAD pauses) and "
        "each clause is translated and spoken at once; utterance: each utterance is transcribed, translated "
        "and spoken after it ends (the comparison baseline of make bench).",
    )
    clause_pause_ms: int = option(
        200,
        "local_agreement: silence inside speech that closes a clause, in milliseconds (the VAD's pause_ms): "
        "what was said is committed, translated and spoken without waiting for the end of the utterance.",
    )
    vad_min_silence_ms: int | None = option(
        None, "Silence that ends an utterance, in ms; empty: the VAD server's default."
    )
    stt_timeout_s: float = option(60.0, "Per-call timeout of speech-to-text, in seconds.")
    translate_timeout_s: float = option(30.0, "Per-call timeout of translation, in seconds.")
    tts_timeout_s: float = option(60.0, "Per-call timeout of text-to-speech (the whole stream), in seconds.")
    deadline_margin_ms: float = option(
        50.0, "Kept back from the caller's remaining deadline on each downstream call, in ms."
    )
    retry_max_attempts: int = option(
        3,
        "Attempts per unary stage call, made by the stage's channel on UNAVAILABLE (gRPC retryPolicy "
        "maxAttempts; gRPC caps it at 5); 1: no retries. Streams are never retried.",
    )
    retry_initial_backoff_ms: float = option(
        50.0, "The first retry's wait, in ms, doubling per retry (retryPolicy initialBackoff; jittered 20 %)."
    )
    retry_max_backoff_ms: float = option(500.0, "Cap on a retry's wait, in ms (retryPolicy maxBackoff).")
    retry_budget_ratio: float = option(
        0.2,
        "Retry throttle per stage (gRPC retryThrottling tokenRatio, three decimals, > 0): of a bucket of 10 "
        "tokens, each failed attempt takes one and each success gives this many back; no retries while half "
        "is spent.",
    )
    breaker_failure_threshold: int = option(3, "Consecutive failures that open a stage's circuit breaker.")
    breaker_reset_timeout_s: float = option(3.0, "Time a breaker stays open before a probe call, in seconds.")
    reconnect_backoff_max_ms: int = option(
        1000, "Cap on the channel's reconnect backoff to a stage, in ms (gRPC default: 120000)."
    )
