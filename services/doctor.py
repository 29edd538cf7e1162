"""``parley doctor``: a smoke inference of every bundled model, each in its own process.

A native library that crashes (llama.cpp's SIGSEGV in llama-cpp-python 0.3.36 was the reason this exists)
takes its process down with it, so each check runs in a child process: the parent reports the model, the
library and version it ran on, and how the child ended (an exception's message, or the signal by name).
``make setup`` runs it last and fails when any check fails.

Checks (the server defaults, so what passes here is what ``parley up`` loads):

- ``vad``: Silero VAD v6 (onnxruntime) over one second of speech;
- ``stt``: a Whisper decode of a few seconds of speech (faster-whisper on CTranslate2);
- ``translate``: one sentence through the default translation backend (Gemma 3 270M on llama.cpp);
- ``piper``: one sentence spoken by the bundled Piper voice;
- ``espeak``: one French sentence spoken by espeak-ng.

The speech is a real recording: ``--audio FILE`` (16 kHz mono WAV), by default the JFK recording in
``../shared/data`` when that folder lies beside the checkout, else a sentence the Piper voice speaks (so
VAD and Whisper are then checked on synthetic speech, and say so).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.audio import SAMPLE_RATE_HZ, float_to_pcm16, pcm16_to_wav
from services.common.processes import describe_exit

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECORDING = ROOT.parent / "shared" / "data" / "speech" / "jfk" / "jfk.wav"
CHECK_TIMEOUT_S = 300.0
_STDERR_LINES = 12


def _read_wav(path: Path, seconds: float) -> np.ndarray:
    """The first ``seconds`` of a 16 kHz mono PCM_S16LE WAV file, float32 in [-1, 1]."""
    with wave.open(str(path), "rb") as w:
        if w.getframerate() != SAMPLE_RATE_HZ or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: need 16 kHz mono 16-bit WAV")
        frames = w.readframes(int(seconds * SAMPLE_RATE_HZ))
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0


def _check_vad(audio: Path) -> str:
    from services.common.models import silero_vad_path
    from services.vad.engine import SileroVad

    probs = SileroVad(silero_vad_path()).probabilities(_read_wav(audio, 1.0))
    if probs.size == 0 or not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        raise RuntimeError(f"speech probabilities out of [0, 1]: {probs[:8]}")
    return f"{probs.size} frames, speech probability up to {probs.max():.2f}"


def _check_stt(audio: Path) -> str:
    from faster_whisper import WhisperModel

    from services.common.models import resolve_whisper
    from services.stt.config import SttConfig

    model = WhisperModel(resolve_whisper(SttConfig().model), device="cpu", compute_type="int8", cpu_threads=2)
    segments, info = model.transcribe(_read_wav(audio, 4.0), beam_size=1, vad_filter=False)
    text = " ".join(s.text.strip() for s in segments).strip()
    if not text:
        raise RuntimeError("the decode returned no text for speech")
    return f"({info.language}) {text!r}"


def _check_translate(_audio: Path) -> str:
    from services.common.deadlines import Deadline
    from services.translate.config import TranslateConfig
    from services.translate.engine import load_backend

    backend = load_backend(TranslateConfig())
    try:
        pair = backend.resolve("en", "fr")
        (text,) = backend.translate_sentences(["Good morning, everyone."], pair, Deadline.after(120.0))
    finally:
        backend.close()
    if not text.strip():
        raise RuntimeError("the translation is empty")
    return f"en->fr {text!r}"


def _check_piper(_audio: Path) -> str:
    from services.tts.config import BUNDLED_PIPER_VOICE
    from services.tts.engine import PiperSynthesizer, piper_model_path

    synth = PiperSynthesizer(piper_model_path(BUNDLED_PIPER_VOICE))
    samples = synth.synthesize("Hello there, this is Parley.", 1.0)
    if samples.size == 0 or not np.any(samples):
        raise RuntimeError("Piper returned no audio")
    return f"{samples.size / synth.info.sample_rate_hz:.2f} s of audio at {synth.info.sample_rate_hz} Hz"


def _check_espeak(_audio: Path) -> str:
    import shutil

    from services.tts.config import TtsConfig
    from services.tts.engine import EspeakSynthesizer, find_espeak_voice

    executable = shutil.which(TtsConfig().espeak_path)
    if executable is None:
        raise RuntimeError("espeak-ng is not installed (Debian package espeak-ng)")
    voice = find_espeak_voice(executable, "fr")
    if voice is None:
        raise RuntimeError("espeak-ng has no French voice")
    synth = EspeakSynthesizer(executable, voice)
    samples = synth.synthesize("Bonjour à tous.", 1.0)
    if samples.size == 0 or not np.any(samples):
        raise RuntimeError("espeak-ng returned no audio")
    return f"{samples.size / synth.info.sample_rate_hz:.2f} s of French audio"


@dataclass(frozen=True)
class Check:
    """One model's smoke inference.

    Attributes:
        name: Short name, for ``--only``.
        model: What is checked, in words.
        libraries: Distributions whose versions a report names.
        run: Runs in the child; returns a one-line summary or raises.
    """

    name: str
    model: str
    libraries: tuple[str, ...]
    run: Callable[[Path], str]


CHECKS = (
    Check("vad", "Silero VAD v6 (ONNX)", ("onnxruntime",), _check_vad),
    Check("stt", "Whisper (default STT model)", ("faster-whisper", "ctranslate2"), _check_stt),
    Check("translate", "Gemma 3 270M GGUF (default translation)", ("llama-cpp-python",), _check_translate),
    Check("piper", "Piper voice en_US-joe-medium", ("piper-tts", "onnxruntime"), _check_piper),
    Check("espeak", "espeak-ng French voice", (), _check_espeak),
)


def _versions(libraries: Sequence[str]) -> str:
    parts = []
    for name in libraries:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


@dataclass(frozen=True)
class Result:
    """How one check ended: ``ok``, a one-line ``summary``, and the child's last stderr lines."""

    check: Check
    ok: bool
    summary: str
    seconds: float
    stderr_tail: tuple[str, ...] = ()

    def line(self) -> str:
        """The report line: model, libraries with versions, outcome."""
        libs = _versions(self.check.libraries)
        where = f"{self.check.model}" + (f" [{libs}]" if libs else "")
        status = "ok  " if self.ok else "FAIL"
        return f"doctor: {status} {self.check.name:<9} {where}: {self.summary} ({self.seconds:.1f} s)"


def run_check(check: Check, audio: Path, timeout_s: float = CHECK_TIMEOUT_S) -> Result:
    """Runs one check in a child process (``python -m services.doctor --child NAME``).

    Returns:
        The result; a crash, a timeout or an exception in the child is a failed result, never raised.
    """
    started = time.perf_counter()
    command = [sys.executable, "-m", "services.doctor", "--child", check.name, "--audio", str(audio)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, check=False
        )
    except subprocess.TimeoutExpired:
        return Result(check, False, f"no answer within {timeout_s:.0f} s", time.perf_counter() - started)
    seconds = time.perf_counter() - started
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode == 0:
        return Result(check, True, done.stdout.strip().splitlines()[-1], seconds)
    if done.returncode < 0:
        summary = describe_exit(done.returncode)
    else:
        summary = lines[-1] if lines else describe_exit(done.returncode)
    return Result(check, False, summary, seconds, tuple(lines[-_STDERR_LINES:]))


def _sample_speech(directory: Path) -> Path:
    """A sentence spoken by the bundled Piper voice, at 16 kHz, when no recording is at hand."""
    import soxr

    from services.tts.config import BUNDLED_PIPER_VOICE
    from services.tts.engine import PiperSynthesizer, piper_model_path

    synth = PiperSynthesizer(piper_model_path(BUNDLED_PIPER_VOICE))
    samples = synth.synthesize("And so, my fellow Americans, ask not what your country can do for you.", 1.0)
    samples = soxr.resample(samples, synth.info.sample_rate_hz, SAMPLE_RATE_HZ)
    path = directory / "sample.wav"
    path.write_bytes(pcm16_to_wav(float_to_pcm16(samples), SAMPLE_RATE_HZ))
    return path


def diagnose(only: Sequence[str] = (), audio: Path | None = None, out=None) -> int:
    """Runs the checks named in ``only`` (all when empty), prints one line each; returns the exit code.

    Returns:
        0 when every check passed, 1 otherwise.
    """
    out = out or sys.stdout
    checks = [c for c in CHECKS if not only or c.name in only]
    with tempfile.TemporaryDirectory(prefix="parley-doctor-") as tmp:
        if audio is None:
            if DEFAULT_RECORDING.is_file():
                audio = DEFAULT_RECORDING
            else:
                audio = _sample_speech(Path(tmp))
                out.write("doctor: no recording at hand (--audio); VAD and Whisper hear the Piper voice\n")
        failed = 0
        for check in checks:
            result = run_check(check, audio)
            out.write(result.line() + "\n")
            for line in result.stderr_tail:
                out.write(f"doctor:      | {line}\n")
            out.flush()
            failed += not result.ok
    if failed:
        out.write(f"doctor: {failed} of {len(checks)} models failed their smoke inference\n")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``parley doctor`` (and of each check's child process, with ``--child``)."""
    parser = argparse.ArgumentParser(
        prog="parley doctor", description="Smoke inference of every bundled model, each in its own process."
    )
    names = [c.name for c in CHECKS]
    parser.add_argument("--only", nargs="+", choices=names, default=[], help="checks to run; default all")
    parser.add_argument("--audio", type=Path, default=None, help="16 kHz mono WAV with speech")
    parser.add_argument("--child", choices=names, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        check = next(c for c in CHECKS if c.name == args.child)
        sys.stdout.write(check.run(args.audio) + "\n")
        return 0
    return diagnose(args.only, args.audio)


if __name__ == "__main__":
    sys.exit(main())
