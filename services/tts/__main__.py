"""``python -m services.tts`` / ``parley serve tts``: the text-to-speech server."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from parley.tts.v1 import tts_pb2, tts_pb2_grpc
from services.common.config import load_config
from services.common.inference import BatchedPool
from services.common.server import ModelRuntime, Stage, run
from services.tts.config import TtsConfig
from services.tts.engine import ESPEAK, Synthesizer, TtsEngine, load_voices
from services.tts.servicer import SpeechSynthesisServicer

SERVICE_NAME = tts_pb2.DESCRIPTOR.services_by_name["SpeechSynthesis"].full_name

TtsRuntime = ModelRuntime[TtsEngine, list[BatchedPool], SpeechSynthesisServicer]


def voice_pools(voices: Sequence[Synthesizer], config: TtsConfig) -> list[BatchedPool]:
    """The TTS batcher: an instance group per voice, in batches of one (a voice speaks one text per call).

    Each Piper voice gets ``piper_workers`` threads of its own; the espeak-ng voices share
    ``espeak_workers`` (each call runs an espeak-ng process).

    Returns:
        One pool per voice, in the order of ``voices`` (the espeak-ng voices' is one shared object).
    """
    espeak: BatchedPool | None = None
    pools = []
    for voice in voices:
        if voice.info.backend == ESPEAK:
            espeak = espeak or BatchedPool("tts-espeak", config.espeak_workers)
            pools.append(espeak)
        else:
            pools.append(BatchedPool(f"tts-{voice.info.name}", config.piper_workers))
    return pools


def load(config: TtsConfig) -> TtsRuntime:
    """Loads and warms the voices, then their pools, the engine over both, and the servicer.

    Raises:
        FileNotFoundError: A configured Piper voice file is missing.
        FailedPrecondition: No voice at all could be loaded.
    """
    voices = load_voices(config)
    pools = voice_pools(voices, config)
    try:
        engine = TtsEngine.from_config(list(zip(voices, pools, strict=True)), config)
    except BaseException:
        _close_pools(pools)
        raise
    return ModelRuntime(engine, pools, SpeechSynthesisServicer(engine))


def add_servicers(server: grpc.aio.Server, runtime: TtsRuntime, config: TtsConfig) -> None:
    """Registers ``parley.tts.v1.SpeechSynthesis`` on ``server``."""
    tts_pb2_grpc.add_SpeechSynthesisServicer_to_server(runtime.servicer, server)


def _close_pools(pools: list[BatchedPool]) -> None:
    for pool in {id(pool): pool for pool in pools}.values():
        pool.close()


def close(runtime: TtsRuntime) -> None:
    """Once the server has stopped: drops the queued texts and stops every pool (bounded wait for a call)."""
    _close_pools(runtime.batcher)


STAGE: Stage[TtsConfig, TtsRuntime] = Stage(
    name="tts",
    service_names=(SERVICE_NAME,),
    load=load,
    add_servicers=add_servicers,
    close=close,
)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parses the configuration and serves until SIGTERM."""
    run(STAGE, load_config(TtsConfig, argv, prog=prog))


if __name__ == "__main__":
    main()
