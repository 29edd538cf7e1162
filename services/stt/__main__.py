"""Speech-to-text server: ``python -m services.stt`` or ``parley serve stt``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grpc

from parley.stt.v1 import stt_pb2, stt_pb2_grpc
from services.common.batching import STAGE_CLOSE_TIMEOUT_S, DynamicBatcher, split_on_oom
from services.common.config import load_config
from services.common.server import ModelRuntime, Stage, run
from services.stt import engine
from services.stt.config import Backend, SttConfig
from services.stt.engine import SttBackend, Transcript, Window
from services.stt.servicer import SpeechToTextServicer

SERVICE_NAME = stt_pb2.DESCRIPTOR.services_by_name["SpeechToText"].full_name

SttRuntime = ModelRuntime[SttBackend, DynamicBatcher[Window, Transcript], SpeechToTextServicer]


def load_backend(config: SttConfig) -> SttBackend:
    """Loads and warms the configured backend.

    Raises:
        ValueError: Settings the backend cannot work with.
    """
    if config.backend is Backend.OPENAI:
        from services.stt.openai_backend import OpenAiTranscriptionBackend

        backend = OpenAiTranscriptionBackend.from_config(config)
        backend.warm()
        return backend
    return engine.load(config)


def batcher_for(backend: SttBackend, config: SttConfig) -> DynamicBatcher[Window, Transcript]:
    """The dynamic batcher of Whisper windows.

    One instance per backend worker; windows of one bucket share a batch (the backend's ``batch_key``); the
    servicer's priority levels; a batch that runs out of GPU memory is retried in halves
    (:func:`split_on_oom`).

    Raises:
        ValueError: Invalid batching settings.
    """
    settings = dataclasses.replace(
        config, priority_levels=SpeechToTextServicer.PRIORITY_LEVELS, instance_count=backend.workers
    )
    fns = [split_on_oom(backend.transcribe_batch)] * settings.instance_count
    return DynamicBatcher("stt", fns, settings, batch_key=backend.batch_key)


def load(config: SttConfig) -> SttRuntime:
    """Loads and warms the backend, then its batcher and the servicer.

    Raises:
        ValueError: Settings the backend or the batcher cannot work with.
    """
    backend = load_backend(config)
    try:
        batcher = batcher_for(backend, config)
    except BaseException:
        backend.close()
        raise
    return ModelRuntime(backend, batcher, SpeechToTextServicer(backend, batcher, config))


def add_servicers(server: grpc.aio.Server, runtime: SttRuntime, config: SttConfig) -> None:
    """Registers ``parley.stt.v1.SpeechToText`` on ``server``."""
    stt_pb2_grpc.add_SpeechToTextServicer_to_server(runtime.servicer, server)


def close(runtime: SttRuntime) -> None:
    """Once the server has stopped: drops the queued windows, stops the VAD threads, closes the backend.

    The backend stays open while a batch is still decoding (its thread is a daemon and ends with the
    process).
    """
    stopped = runtime.batcher.close(drain=False, timeout_s=STAGE_CLOSE_TIMEOUT_S)
    runtime.servicer.close()
    if stopped:
        runtime.engine.close()


STAGE: Stage[SttConfig, SttRuntime] = Stage(
    name="stt",
    service_names=(SERVICE_NAME,),
    load=load,
    add_servicers=add_servicers,
    close=close,
)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parses the config from flags and ``PARLEY_*`` variables, then serves until SIGTERM."""
    run(STAGE, load_config(SttConfig, argv, prog=prog))


if __name__ == "__main__":
    main()
