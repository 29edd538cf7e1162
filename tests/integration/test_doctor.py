"""`parley doctor`: every bundled model's smoke inference, and a broken model named in the failure."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys

from services.common.models import whisper_base_dir
from services.harness import ROOT
from tests.helpers import shared_data


def doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "doctor", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=600,
        check=False,
    )


def test_every_bundled_model_passes_its_smoke_inference():
    jfk = shared_data("speech", "jfk", "jfk.wav")
    done = doctor("--audio", str(jfk))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for name in ("vad", "stt", "translate", "piper", "espeak"):
        assert any(line.startswith(f"doctor: ok   {name} ") for line in lines), done.stdout
    assert "ask" in done.stdout.lower()  # Whisper heard JFK's "ask not what your country..."


def test_a_corrupt_whisper_model_fails_naming_the_model_library_and_error(tmp_path):
    """A model file of the right size but wrong bytes (trusted by the assembler, refused by CTranslate2)."""
    broken = tmp_path / "whisper-base"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(whisper_base_dir() / name, broken / name)
    with (broken / "model.bin").open("wb") as f:
        f.truncate((whisper_base_dir() / "model.bin").stat().st_size)  # all zero bytes
    jfk = shared_data("speech", "jfk", "jfk.wav")
    done = doctor("--only", "stt", "--audio", str(jfk), env={"PARLEY_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("doctor: FAIL stt")]
    assert "Whisper" in line
    assert f"ctranslate2 {importlib.metadata.version('ctranslate2')}" in line
    assert "Error" in line  # the exception's type and message from the child process
    assert "1 of 1 models failed" in done.stdout
