"""PCM decoding checks shared by every stage: float samples must be finite and within full scale."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.audio import PCM_F32LE, PcmStream, decode_pcm
from services.common.errors import InvalidArgument


def f32(*samples: float) -> bytes:
    return np.array(samples, dtype="<f4").tobytes()


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        ((0.1, 1e30, 0.2), "sample 1e\\+30 is outside \\[-1, 1\\]"),
        ((-1.5,), "sample -1.5 is outside"),
        ((0.0, float("nan")), "NaN or infinite"),
        ((float("-inf"),), "NaN or infinite"),
    ],
)
def test_float_samples_beyond_full_scale_or_not_finite_are_refused(samples, message):
    with pytest.raises(InvalidArgument, match=message):
        decode_pcm(f32(*samples), PCM_F32LE, 16000, 1, target_rate_hz=16000, max_duration_s=10)
    stream = PcmStream(PCM_F32LE, 16000, 1, target_rate_hz=16000)
    with pytest.raises(InvalidArgument, match=message):
        stream.push(f32(*samples))


def test_full_scale_and_rounding_margin_are_accepted():
    audio = decode_pcm(
        f32(1.0, -1.0, 1.00005, -0.5), PCM_F32LE, 16000, 1, target_rate_hz=16000, max_duration_s=10
    )
    assert audio.tolist() == pytest.approx([1.0, -1.0, 1.00005, -0.5])
    stream = PcmStream(PCM_F32LE, 16000, 2, target_rate_hz=16000)  # split inside a sample
    payload = f32(1.0, -1.0, 0.5, 0.5)
    assert len(stream.push(payload[:5])) == 0
    assert stream.push(payload[5:]).tolist() == [0.0, 0.5]
