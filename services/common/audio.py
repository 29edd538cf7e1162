"""PCM decoding, validation and resampling shared by every stage.

All functions return float32 mono audio in [-1, 1], shape ``(n_samples,)``. Resampling uses soxr
(libsoxr's VHQ-grade polyphase filter), not a filter of our own.
"""

from __future__ import annotations

import io
import wave

import numpy as np
import soxr

from services.common.errors import InvalidArgument

PCM_S16LE = 1
PCM_F32LE = 2
_SAMPLE_WIDTH = {PCM_S16LE: 2, PCM_F32LE: 4}
_ENCODING_NAMES = {PCM_S16LE: "PCM_S16LE", PCM_F32LE: "PCM_F32LE"}

SAMPLE_RATE_HZ = 16000  # what VAD and Whisper take: 16 kHz mono
MIN_SAMPLE_RATE_HZ = 8000
MAX_SAMPLE_RATE_HZ = 192000
MAX_CHANNELS = 8
# Largest PCM_F32LE magnitude accepted: full scale is 1.0; the margin lets through the rounding of integer
# audio converted to float (x / 32767 and the like), not overshoots. Huge values would cost the models
# seconds of CPU per request, so anything beyond is refused.
MAX_F32_MAGNITUDE = 1.0001


def check_format(encoding: int, sample_rate_hz: int, channels: int) -> int:
    """Validates an ``AudioFormat``; returns the channel count (0 read as 1).

    Raises:
        InvalidArgument: Unknown encoding, or a sample rate or channel count the server cannot take.
    """
    if encoding not in _SAMPLE_WIDTH:
        raise InvalidArgument(
            f"unknown audio encoding {encoding}: use PCM_S16LE (1) or PCM_F32LE (2) in format.encoding"
        )
    if not MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise InvalidArgument(
            f"sample_rate_hz {sample_rate_hz} is out of range: send audio between "
            f"{MIN_SAMPLE_RATE_HZ} and {MAX_SAMPLE_RATE_HZ} Hz (it is resampled to the model's rate)"
        )
    channels = channels or 1
    if channels > MAX_CHANNELS:
        raise InvalidArgument(f"channels {channels} is more than {MAX_CHANNELS}: send mono or stereo audio")
    return channels


def _to_float(data: bytes, encoding: int, channels: int) -> np.ndarray:
    if encoding == PCM_S16LE:
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    else:
        samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
        within = np.abs(samples) <= MAX_F32_MAGNITUDE  # False for NaN as well
        if not within.all():
            bad = float(samples[np.argmin(within)])
            if not np.isfinite(bad):
                raise InvalidArgument("PCM_F32LE audio contains NaN or infinite samples")
            raise InvalidArgument(
                f"PCM_F32LE sample {bad:g} is outside [-1, 1]: float audio is full scale at 1.0; "
                "scale or clip it before sending"
            )
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return samples


def decode_pcm(
    data: bytes,
    encoding: int,
    sample_rate_hz: int,
    channels: int,
    *,
    target_rate_hz: int,
    max_duration_s: float,
) -> np.ndarray:
    """Decodes one whole PCM payload to float32 mono at ``target_rate_hz``.

    Args:
        data: Interleaved little-endian PCM.
        encoding: ``parley.audio.v1.AudioEncoding`` value.
        sample_rate_hz: Rate of ``data``, in Hz.
        channels: Interleaved channels in ``data``; 0 is read as 1. Channels are averaged.
        target_rate_hz: Rate of the result, in Hz.
        max_duration_s: Longest audio accepted, in seconds.

    Returns:
        float32 in [-1, 1], shape ``(n_samples,)``, at ``target_rate_hz``.

    Raises:
        InvalidArgument: Empty audio, a bad format, a byte count that is not a whole number of frames,
            NaN, infinite or out-of-range floats (beyond ``MAX_F32_MAGNITUDE``), or audio longer than
            ``max_duration_s``.
    """
    channels = check_format(encoding, sample_rate_hz, channels)
    if not data:
        raise InvalidArgument("audio is empty: send at least one frame of PCM")
    frame_bytes = _SAMPLE_WIDTH[encoding] * channels
    if len(data) % frame_bytes:
        raise InvalidArgument(
            f"audio has {len(data)} bytes, not a whole number of {frame_bytes}-byte "
            f"{_ENCODING_NAMES[encoding]} frames ({channels} channel(s)): the payload is truncated or "
            "the format is wrong"
        )
    duration_s = len(data) / frame_bytes / sample_rate_hz
    if duration_s > max_duration_s:
        raise InvalidArgument(
            f"audio lasts {duration_s:.1f} s, more than the {max_duration_s:.0f} s this server accepts: "
            "split it, or stream it"
        )
    samples = _to_float(data, encoding, channels)
    if sample_rate_hz != target_rate_hz:
        samples = soxr.resample(samples, sample_rate_hz, target_rate_hz).astype(np.float32)
    return samples


class PcmStream:
    """Decodes a stream of PCM chunks of any size (split anywhere, even inside a sample).

    Args:
        encoding: ``parley.audio.v1.AudioEncoding`` value.
        sample_rate_hz: Rate of the incoming audio, in Hz.
        channels: Interleaved channels; 0 is read as 1.
        target_rate_hz: Rate of the decoded audio, in Hz.

    Raises:
        InvalidArgument: From the constructor on a bad format; from :meth:`push` on NaN, infinite or
            out-of-range floats (beyond ``MAX_F32_MAGNITUDE``).
    """

    def __init__(self, encoding: int, sample_rate_hz: int, channels: int, *, target_rate_hz: int):
        self.channels = check_format(encoding, sample_rate_hz, channels)
        self.encoding = encoding
        self.sample_rate_hz = sample_rate_hz
        self._frame_bytes = _SAMPLE_WIDTH[encoding] * self.channels
        self._pending = b""
        self._resampler = (
            soxr.ResampleStream(sample_rate_hz, target_rate_hz, 1, dtype="float32")
            if sample_rate_hz != target_rate_hz
            else None
        )
        self.bytes_received = 0

    @property
    def duration_s(self) -> float:
        """Audio received so far, in seconds."""
        return self.bytes_received / self._frame_bytes / self.sample_rate_hz

    def push(self, chunk: bytes) -> np.ndarray:
        """Decodes a chunk; returns the float32 mono samples it completes (possibly none)."""
        self.bytes_received += len(chunk)
        data = self._pending + chunk
        whole = len(data) - len(data) % self._frame_bytes
        self._pending = data[whole:]
        samples = _to_float(data[:whole], self.encoding, self.channels)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        return samples

    def flush(self) -> np.ndarray:
        """Ends the stream; returns the resampler's tail. A partial trailing frame is dropped."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        return np.asarray(tail, np.float32)


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """float32 in [-1, 1], shape ``(n_samples,)`` -> PCM_S16LE bytes (clipped)."""
    scaled: np.ndarray = np.clip(samples, -1.0, 1.0) * 32767.0
    return scaled.astype("<i2").tobytes()


def pcm16_to_wav(pcm: bytes, sample_rate_hz: int) -> bytes:
    """Wraps PCM_S16LE mono bytes in a WAV container (RIFF, 16-bit, mono, ``sample_rate_hz``)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate_hz)
        w.writeframes(pcm)
    return buf.getvalue()


def resample(samples: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    """Resamples float32 mono audio with soxr; returns it unchanged when the rates match."""
    if from_hz == to_hz:
        return samples
    return np.asarray(soxr.resample(samples, from_hz, to_hz), np.float32)
