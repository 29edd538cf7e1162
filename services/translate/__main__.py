"""``python -m services.translate`` / ``parley serve translate``: the translation server."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import grpc

from parley.translate.v1 import translate_pb2, translate_pb2_grpc
from services.common.batching import STAGE_CLOSE_TIMEOUT_S, DynamicBatcher, split_on_oom
from services.common.config import load_config
from services.common.server import ModelRuntime, Stage, run
from services.translate.config import Backend, TranslateConfig
from services.translate.engine import SentenceItem, TranslationEngine, batch_key, load_engine
from services.translate.servicer import TranslationServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = translate_pb2.DESCRIPTOR.services_by_name["Translation"].full_name

TranslateRuntime = ModelRuntime[TranslationEngine, DynamicBatcher[SentenceItem, str], TranslationServicer]


def batcher_for(engine: TranslationEngine, config: TranslateConfig) -> DynamicBatcher[SentenceItem, str]:
    """The dynamic batcher over the engine's model instances.

    ``instance_count`` 0 takes the backend's own count. Every backend takes batches of up to
    ``max_batch_size`` sentences (the embedded llm decodes them together, one forward pass per token). A
    CTranslate2 batch that runs out of GPU memory is retried in halves (:func:`split_on_oom`).

    Raises:
        ValueError: Invalid batching settings, or an ``instance_count`` the embedded llm cannot run.
    """
    fns = engine.batch_fns(config.instance_count)
    if config.backend is Backend.CTRANSLATE2:
        fns = [split_on_oom(fn) for fn in fns]
    count = len(fns)
    settings = dataclasses.replace(config, instance_count=count)
    logger.info(
        "translate: batching up to %d sentences, %.1f ms queue delay, %d instance(s), %d priority levels",
        config.max_batch_size,
        config.max_queue_delay_ms,
        count,
        config.priority_levels,
    )
    return DynamicBatcher(
        "translate", fns, settings, batch_key=batch_key, joining=engine.backend.in_flight_batching
    )


def load(config: TranslateConfig) -> TranslateRuntime:
    """Loads and warms the configured backend, then its batcher and the servicer.

    Raises:
        ValueError: Invalid batching settings, or an ``instance_count`` the backend cannot run.
    """
    engine = load_engine(config)
    try:
        batcher = batcher_for(engine, config)
    except BaseException:
        engine.close()
        raise
    return ModelRuntime(engine, batcher, TranslationServicer(engine, batcher))


def add_servicers(server: grpc.aio.Server, runtime: TranslateRuntime, config: TranslateConfig) -> None:
    """Registers ``parley.translate.v1.Translation`` on ``server``."""
    translate_pb2_grpc.add_TranslationServicer_to_server(runtime.servicer, server)


def close(runtime: TranslateRuntime) -> None:
    """Once the server has stopped: drops the queued sentences, then releases the model."""
    if runtime.batcher.close(drain=False, timeout_s=STAGE_CLOSE_TIMEOUT_S):
        runtime.engine.close()


STAGE: Stage[TranslateConfig, TranslateRuntime] = Stage(
    name="translate",
    service_names=(SERVICE_NAME,),
    load=load,
    add_servicers=add_servicers,
    close=close,
)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parses the configuration and serves until SIGTERM."""
    run(STAGE, load_config(TranslateConfig, argv, prog=prog))


if __name__ == "__main__":
    main()
