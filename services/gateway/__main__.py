"""``python -m services.gateway``: the gateway in front of the VAD, STT, translation and TTS servers."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from parley.gateway.v1 import gateway_pb2_grpc
from services.common.config import load_config
from services.common.server import Stage, run
from services.gateway.config import GatewayConfig
from services.gateway.downstream import Downstream
from services.gateway.servicer import GatewayServicer


def _load(config: GatewayConfig) -> None:
    """Nothing to load: the gateway holds no model (its channels are opened on the server's event loop)."""


def _add_servicers(server: grpc.aio.Server, engine: None, config: GatewayConfig) -> None:
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(config, Downstream(config)), server)


STAGE: Stage[GatewayConfig, None] = Stage(
    name="gateway",
    service_names=("parley.gateway.v1.Gateway",),
    load=_load,
    add_servicers=_add_servicers,
)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parses the gateway's config and serves until SIGTERM."""
    run(STAGE, load_config(GatewayConfig, argv, prog=prog))


if __name__ == "__main__":
    main()
