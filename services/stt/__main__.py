"""Speech-to-text server: ``python -m services.stt`` or ``parley serve stt``."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from parley.stt.v1 import stt_pb2_grpc
from services.common.config import load_config
from services.common.server import Stage, run
from services.stt import engine
from services.stt.config import Backend, SttConfig
from services.stt.engine import SttBackend
from services.stt.servicer import SpeechToTextServicer


def load(config: SttConfig) -> SpeechToTextServicer:
    """Loads and warms the configured backend and starts its batcher (the stage's ``load``).

    Raises:
        ValueError: Settings the backend cannot work with.
    """
    backend: SttBackend
    if config.backend is Backend.OPENAI:
        from services.stt.openai_backend import OpenAiTranscriptionBackend

        backend = OpenAiTranscriptionBackend.from_config(config)
        backend.warm()
    else:
        backend = engine.load(config)
    return SpeechToTextServicer(backend, config)


def add_servicers(server: grpc.aio.Server, servicer: SpeechToTextServicer, config: SttConfig) -> None:
    """Registers ``parley.stt.v1.SpeechToText`` on ``server``."""
    stt_pb2_grpc.add_SpeechToTextServicer_to_server(servicer, server)


def close(servicer: SpeechToTextServicer) -> None:
    """Once the server has stopped: decodes what is queued, then releases the threads and the backend."""
    servicer.close()


STAGE: Stage[SttConfig, SpeechToTextServicer] = Stage(
    name="stt",
    service_names=("parley.stt.v1.SpeechToText",),
    load=load,
    add_servicers=add_servicers,
    close=close,
)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parses the config from flags and ``PARLEY_*`` variables, then serves until SIGTERM."""
    run(STAGE, load_config(SttConfig, argv, prog=prog))


if __name__ == "__main__":
    main()
