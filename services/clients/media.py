"""Media files for the commands: any audio or video file decoded to 16 kHz mono PCM (PyAV), WAV written."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from services.common.audio import SAMPLE_RATE_HZ


class MediaError(Exception):
    """The input cannot be turned into audio; the message says why, for the user."""


def decode_audio(path: str | Path, sample_rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """Decodes the first audio stream of any file PyAV reads to PCM_S16LE mono at ``sample_rate_hz``.

    Args:
        path: Audio or video file (wav, flac, mp3, ogg, opus, m4a, mp4, mkv, webm...).
        sample_rate_hz: Output rate, in Hz (default 16 kHz, what VAD and Whisper take).

    Returns:
        int16 samples, shape (n_samples,), mono at ``sample_rate_hz`` (empty for a stream with no samples);
        ``.tobytes()`` is PCM_S16LE.

    Raises:
        MediaError: Missing file, not a media file or corrupt, no audio stream, or a codec FFmpeg lacks.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: the file is empty (0 bytes)")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise MediaError(
            f"{path}: not a media file FFmpeg can read, or corrupt ({exc.strerror or exc})"
        ) from exc
    with container:
        streams = [s for s in container.streams if s.type == "audio"]
        if not streams:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
            raise MediaError(f"{path}: no audio stream in the file (streams found: {kinds})")
        stream = streams[0]
        codec = getattr(stream.codec_context, "name", None) if stream.codec_context is not None else None
        if not codec or codec == "none":
            raise MediaError(f"{path}: unsupported audio codec (FFmpeg has no decoder for this stream)")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate_hz)
        parts: list[np.ndarray] = []
        try:
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as exc:
            raise MediaError(
                f"{path}: the {codec} audio could not be decoded; the file is corrupt or truncated "
                f"({exc.strerror or exc})"
            ) from exc
    return np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, dtype=np.int16)


def write_wav(path: str | Path, pcm: bytes, sample_rate_hz: int) -> None:
    """Writes PCM_S16LE mono as a WAV file, making its folder when missing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate_hz)
        w.writeframes(pcm)
