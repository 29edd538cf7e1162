"""Speech-to-text server: ``python -m services.stt`` or ``parley serve stt``."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from parley.stt.v1 import stt_pb2_grpc
from services.common.config import load_config
from services.common.server import Stage, run
from services.stt.config import SttConfig
from services.stt.engine import WhisperEngine, load
from services.stt.servicer import SpeechToTextServicer


def add_servicers(server: grpc.aio.Server, engine: WhisperEngine, config: SttConfig) -> None:
    """Registers ``parley.stt.v1.SpeechToText`` on ``server``."""
    stt_pb2_grpc.add_SpeechToTextServicer_to_server(SpeechToTextServicer(engine, config), server)


STAGE = Stage(
    name="stt",
    service_names=("parley.stt.v1.SpeechToText",),
    load=load,
    add_servicers=add_servicers,
)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parses the config from flags and ``PARLEY_*`` variables, then serves until SIGTERM."""
    run(STAGE, load_config(SttConfig, argv, prog=prog))


if __name__ == "__main__":
    main()
