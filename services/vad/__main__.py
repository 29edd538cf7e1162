"""``python -m services.vad`` / ``parley serve vad``: the voice activity detection server."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grpc

from parley.vad.v1 import vad_pb2_grpc
from services.common.config import load_config
from services.common.inference import InferencePool
from services.common.models import silero_vad_path
from services.common.server import Stage, run
from services.vad.config import VadConfig
from services.vad.engine import SileroVad
from services.vad.servicer import SERVICE_NAME, VadServicer


@dataclasses.dataclass
class VadRuntime:
    """The loaded model and the threads that run it."""

    vad: SileroVad
    pool: InferencePool


def _load(config: VadConfig) -> VadRuntime:
    vad = SileroVad(silero_vad_path(), intra_op_threads=config.intra_op_threads)
    vad.warmup()
    return VadRuntime(vad, InferencePool("vad", config.inference_workers))


def _add_servicers(server: grpc.aio.Server, runtime: VadRuntime, config: VadConfig) -> None:
    vad_pb2_grpc.add_VoiceActivityDetectionServicer_to_server(
        VadServicer(runtime.vad, config, runtime.pool), server
    )


def _close(runtime: VadRuntime) -> None:
    runtime.pool.close()
    runtime.vad.close()


STAGE: Stage[VadConfig, VadRuntime] = Stage(
    name="vad",
    service_names=(SERVICE_NAME,),
    load=_load,
    add_servicers=_add_servicers,
    close=_close,
)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parses the configuration and serves until SIGTERM."""
    run(STAGE, load_config(VadConfig, argv, prog=prog))


if __name__ == "__main__":
    main()
