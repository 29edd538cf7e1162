"""Configuration of the VAD server."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.batching import BatchingConfig
from services.common.config import ServerConfig, StreamLimitsConfig, option


@dataclass(frozen=True)
class VadConfig(StreamLimitsConfig, BatchingConfig, ServerConfig):
    """Voice activity detection server (Silero VAD v6, ONNX on CPU).

    The detection defaults apply to every request field left unset. ``min_silence_ms`` defaults to 500 ms
    because StreamDetect is the gateway's endpointer: pauses inside a sentence are mostly under 300 ms, so
    500 ms rarely cuts a speaker mid-sentence, while the turn still ends about half a second after the
    speaker stops (faster-whisper's 2000 ms suits offline chunking for Whisper, not a live conversation).

    Model calls go through a dynamic batcher (:class:`BatchingConfig`): an item is one stream's chunk of
    frames with that stream's state. Live streams are served at level 0, whole clips (Detect) at the lowest
    level, cut into calls of ``detect_frames_per_call`` frames so a long clip never holds up live streams
    for long. The v6 export runs the streams of a batch one after another (its state has batch size 1), so
    batching saves no compute: the queue delay defaults to 0. StreamDetect calls are bounded by
    :class:`StreamLimitsConfig` (streams at once, idle timeout, longest stream).
    """

    max_queue_delay_ms: float = option(
        0.0, "Longest time the oldest queued chunk waits for company while an instance is idle, in ms."
    )
    max_queue_size: int = option(
        256, "Chunks that may wait in the queue; when full, requests fail RESOURCE_EXHAUSTED. 0 = unbounded."
    )
    priority_levels: int = option(2, "Priority levels: 0 for live streams, 1 for whole clips (Detect).")
    instance_count: int = option(2, "Inference threads calling the shared ONNX session, fed by one queue.")

    threshold: float = option(0.5, "Default speech probability threshold, in [0, 1].")
    min_speech_ms: int = option(250, "Default shortest segment kept, in milliseconds.")
    min_silence_ms: int = option(
        500, "Default silence that ends a segment (endpointing delay), in milliseconds."
    )
    pause_ms: int = option(
        0,
        "Default StreamDetect pause: silence inside speech that sends a SpeechPaused event, in milliseconds "
        "(0: none). The gateway asks for its own (--clause-pause-ms).",
    )
    speech_pad_ms: int = option(30, "Default padding added on each side of a segment, in milliseconds.")
    max_speech_s: float = option(30.0, "Default longest segment before it is split, in seconds.")
    max_audio_s: float = option(3600.0, "Longest clip Detect accepts, in seconds.")
    intra_op_threads: int = option(1, "onnxruntime intra-op threads per inference call.")
    detect_frames_per_call: int = option(
        1024, "Detect: most 32 ms frames per model call (a long clip is several batcher items)."
    )
