"""``python -m services.tts`` / ``parley serve tts``: the text-to-speech server."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from parley.tts.v1 import tts_pb2, tts_pb2_grpc
from services.common.config import load_config
from services.common.server import Stage, run
from services.tts.config import TtsConfig
from services.tts.engine import TtsEngine
from services.tts.servicer import SpeechSynthesisServicer


def _add_servicers(server: grpc.aio.Server, engine: TtsEngine, config: TtsConfig) -> None:
    tts_pb2_grpc.add_SpeechSynthesisServicer_to_server(SpeechSynthesisServicer(engine), server)


STAGE: Stage[TtsConfig, TtsEngine] = Stage(
    name="tts",
    service_names=(tts_pb2.DESCRIPTOR.services_by_name["SpeechSynthesis"].full_name,),
    load=TtsEngine.load,
    add_servicers=_add_servicers,
    close=TtsEngine.close,
)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parses the configuration and serves until SIGTERM."""
    run(STAGE, load_config(TtsConfig, argv, prog=prog))


if __name__ == "__main__":
    main()
