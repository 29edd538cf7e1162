"""``python -m services.vad`` / ``parley serve vad``: the voice activity detection server."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grpc
import numpy as np

from parley.vad.v1 import vad_pb2_grpc
from services.common.batching import STAGE_CLOSE_TIMEOUT_S, DynamicBatcher
from services.common.config import load_config
from services.common.models import silero_vad_path
from services.common.server import Stage, run
from services.vad.config import VadConfig
from services.vad.engine import ModelState, SileroVad
from services.vad.servicer import SERVICE_NAME, VadServicer


@dataclasses.dataclass
class VadRuntime:
    """The loaded model and the dynamic batcher that calls it: (windows, state) in, (probs, state) out."""

    vad: SileroVad
    batcher: DynamicBatcher[tuple[np.ndarray, ModelState], tuple[np.ndarray, ModelState]]


def _load(config: VadConfig) -> VadRuntime:
    vad = SileroVad(silero_vad_path(), intra_op_threads=config.intra_op_threads)
    vad.warmup()
    return VadRuntime(vad, DynamicBatcher("vad", [vad.infer_batch] * config.instance_count, config))


def _add_servicers(server: grpc.aio.Server, runtime: VadRuntime, config: VadConfig) -> None:
    vad_pb2_grpc.add_VoiceActivityDetectionServicer_to_server(VadServicer(config, runtime.batcher), server)


def _close(runtime: VadRuntime) -> None:
    if runtime.batcher.close(drain=False, timeout_s=STAGE_CLOSE_TIMEOUT_S):
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
