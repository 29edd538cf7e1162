"""Configuration of the VAD server."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ServerConfig, option


@dataclass(frozen=True)
class VadConfig(ServerConfig):
    """Voice activity detection server (Silero VAD v6, ONNX on CPU).

    The detection defaults apply to every request field left unset. ``min_silence_ms`` defaults to 500 ms
    because StreamDetect is the gateway's endpointer: pauses inside a sentence are mostly under 300 ms, so
    500 ms rarely cuts a speaker mid-sentence, while the turn still ends about half a second after the
    speaker stops (faster-whisper's 2000 ms suits offline chunking for Whisper, not a live conversation).
    """

    threshold: float = option(0.5, "Default speech probability threshold, in [0, 1].")
    min_speech_ms: int = option(250, "Default shortest segment kept, in milliseconds.")
    min_silence_ms: int = option(
        500, "Default silence that ends a segment (endpointing delay), in milliseconds."
    )
    speech_pad_ms: int = option(30, "Default padding added on each side of a segment, in milliseconds.")
    max_speech_s: float = option(30.0, "Default longest segment before it is split, in seconds.")
    max_audio_s: float = option(3600.0, "Longest clip Detect accepts, in seconds.")
    intra_op_threads: int = option(1, "onnxruntime intra-op threads per inference call.")
    inference_workers: int = option(2, "Threads calling the shared ONNX session at once.")
