"""``python -m services.translate`` / ``parley serve translate``: the translation server."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grpc

from parley.translate.v1 import translate_pb2_grpc
from services.common.config import load_config
from services.common.inference import InferencePool
from services.common.server import Stage, run
from services.translate.config import TranslateConfig
from services.translate.engine import TranslationEngine, load_engine
from services.translate.servicer import SERVICE_NAME, TranslationServicer


@dataclasses.dataclass
class TranslateRuntime:
    """The loaded engine and the threads that call it (as many as the backend can serve at once)."""

    engine: TranslationEngine
    pool: InferencePool


def _load(config: TranslateConfig) -> TranslateRuntime:
    engine = load_engine(config)
    return TranslateRuntime(engine, InferencePool("translate", engine.backend.workers))


def _add_servicers(server: grpc.aio.Server, runtime: TranslateRuntime, config: TranslateConfig) -> None:
    translate_pb2_grpc.add_TranslationServicer_to_server(
        TranslationServicer(runtime.engine, runtime.pool), server
    )


def _close(runtime: TranslateRuntime) -> None:
    runtime.pool.close()
    runtime.engine.close()


STAGE: Stage[TranslateConfig, TranslateRuntime] = Stage(
    name="translate",
    service_names=(SERVICE_NAME,),
    load=_load,
    add_servicers=_add_servicers,
    close=_close,
)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parses the configuration and serves until SIGTERM."""
    run(STAGE, load_config(TranslateConfig, argv, prog=prog))


if __name__ == "__main__":
    main()
