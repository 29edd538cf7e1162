"""``python -m services.gateway``: the gateway in front of the VAD, STT, translation and TTS servers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import grpc

from parley.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.audio import SAMPLE_RATE_HZ
from services.common.config import load_config
from services.common.server import Stage, run
from services.gateway.config import GatewayConfig
from services.gateway.downstream import Downstream
from services.gateway.servicer import GatewayServicer
from services.gateway.session import VAD_LOOKBACK_SAMPLES

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


def _load(config: GatewayConfig) -> None:
    """Checks the config; nothing to load: the gateway holds no model (channels open on the event loop).

    Raises:
        ValueError: ``max_buffer_s`` leaves audio intake no room ahead of the VAD (see
            :meth:`services.gateway.session.StreamSession._hold_from`).
    """
    least_s = config.max_utterance_s + VAD_LOOKBACK_SAMPLES / SAMPLE_RATE_HZ + 1.0
    if config.max_buffer_s < least_s:
        raise ValueError(
            f"--max-buffer-s {config.max_buffer_s:g} must be at least --max-utterance-s + 3 s ({least_s:g}): "
            "the buffer holds the longest utterance and the audio read ahead of the VAD"
        )


def _add_servicers(
    server: grpc.aio.Server, engine: None, config: GatewayConfig
) -> Callable[[float], Awaitable[None]]:
    servicer = GatewayServicer(config, Downstream(config))
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    return servicer.drain


STAGE: Stage[GatewayConfig, None] = Stage(
    name="gateway",
    service_names=(SERVICE_NAME,),
    load=_load,
    add_servicers=_add_servicers,
)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parses the gateway's config and serves until SIGTERM."""
    run(STAGE, load_config(GatewayConfig, argv, prog=prog))


if __name__ == "__main__":
    main()
