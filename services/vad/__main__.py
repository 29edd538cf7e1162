"""``python -m services.vad`` / ``parley serve vad``: the voice activity detection server."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from parley.vad.v1 import vad_pb2, vad_pb2_grpc
from services.common.batching import STAGE_CLOSE_TIMEOUT_S, DynamicBatcher
from services.common.config import load_config
from services.common.models import silero_vad_path
from services.common.server import ModelRuntime, Stage, run
from services.vad.config import VadConfig
from services.vad.engine import SileroVad
from services.vad.servicer import VadBatcher, VadServicer

SERVICE_NAME = vad_pb2.DESCRIPTOR.services_by_name["VoiceActivityDetection"].full_name

VadRuntime = ModelRuntime[SileroVad, VadBatcher, VadServicer]


def load(config: VadConfig) -> VadRuntime:
    """Loads and warms Silero, then its batcher ((windows, state) in, (probs, state) out) and the servicer.

    Raises:
        ValueError: Invalid batching settings.
    """
    vad = SileroVad(silero_vad_path(), intra_op_threads=config.intra_op_threads)
    vad.warmup()
    batcher: VadBatcher = DynamicBatcher("vad", [vad.infer_batch] * config.instance_count, config)
    return ModelRuntime(vad, batcher, VadServicer(config, batcher))


def add_servicers(server: grpc.aio.Server, runtime: VadRuntime, config: VadConfig) -> None:
    """Registers ``parley.vad.v1.VoiceActivityDetection`` on ``server``."""
    vad_pb2_grpc.add_VoiceActivityDetectionServicer_to_server(runtime.servicer, server)


def close(runtime: VadRuntime) -> None:
    """Once the server has stopped: drops the queued windows, then releases the model."""
    if runtime.batcher.close(drain=False, timeout_s=STAGE_CLOSE_TIMEOUT_S):
        runtime.engine.close()


STAGE: Stage[VadConfig, VadRuntime] = Stage(
    name="vad",
    service_names=(SERVICE_NAME,),
    load=load,
    add_servicers=add_servicers,
    close=close,
)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parses the configuration and serves until SIGTERM."""
    run(STAGE, load_config(VadConfig, argv, prog=prog))


if __name__ == "__main__":
    main()
