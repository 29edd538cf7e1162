"""The Gateway servicer: validates the stream's first message, enforces the stream limit, runs a session."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from prometheus_client import Gauge

from parley.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.audio import check_format
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.resilience import Deadline
from services.gateway.config import GatewayConfig
from services.gateway.downstream import Downstream
from services.gateway.file_job import FileTranslator
from services.gateway.session import StreamSession

logger = logging.getLogger(__name__)

# Time kept from the grace period for the streams' last events to reach their callers, in seconds.
DRAIN_MARGIN_S = 1.0

ACTIVE_STREAMS = Gauge("parley_gateway_active_streams", "TranslateSpeech streams in progress.")


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """``parley.gateway.v1.Gateway``.

    Args:
        config: Gateway configuration (stream limit, buffers, resilience policy).
        downstream: Guarded stubs of the four stages.
    """

    def __init__(self, config: GatewayConfig, downstream: Downstream):
        self.config = config
        self.downstream = downstream
        self.active = 0
        self.sessions: set[StreamSession] = set()
        self.files = FileTranslator(
            downstream.vad, downstream.stt, downstream.translation, guards=downstream.guards
        )

    async def TranslateSpeech(
        self,
        request_iterator: AsyncIterator[gateway_pb2.TranslateSpeechRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[gateway_pb2.TranslateSpeechResponse]:
        """Live speech translation; see ``gateway.proto`` and :mod:`services.gateway.session`.

        Raises:
            ResourceExhausted: ``max_streams`` streams are already open.
            InvalidArgument: Audio before the config, a second config, an unknown encoding or a bad rate,
                DIRECT mode into a language other than English.
        """
        if self.active >= self.config.max_streams:
            raise ResourceExhausted(
                f"the gateway serves at most {self.config.max_streams} streams at once: retry with backoff"
            )
        self.active += 1
        ACTIVE_STREAMS.inc()
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None:
                raise InvalidArgument(
                    "the stream ended before its config: send a TranslateSpeechConfig first"
                )
            if first.WhichOneof("request") != "config":
                raise InvalidArgument(
                    "audio before the config: the first message must be a TranslateSpeechConfig"
                )
            fmt = first.config.input_format
            check_format(fmt.encoding, fmt.sample_rate_hz, fmt.channels)
            session = StreamSession(
                self.config, self.downstream, first.config, Deadline.after(context.time_remaining())
            )
            self.sessions.add(session)
            try:
                async for response in session.run(request_iterator):
                    yield response
            finally:
                self.sessions.discard(session)
        finally:
            self.active -= 1
            ACTIVE_STREAMS.dec()

    async def drain(self, grace_s: float) -> None:
        """Ends every live stream cleanly within ``grace_s`` seconds (the server's drain hook, on SIGTERM).

        Each stream stops reading audio, finishes the utterances already detected while the time lasts,
        sends an UNAVAILABLE error event for each one it could not finish, then EndOfStream.
        """
        budget_s = max(0.0, grace_s - DRAIN_MARGIN_S)
        await asyncio.gather(*(session.drain(budget_s) for session in list(self.sessions)))

    async def TranslateFile(
        self,
        request_iterator: AsyncIterator[gateway_pb2.TranslateFileRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[gateway_pb2.TranslateFileResponse]:
        """Subtitles for a whole recording; see ``gateway.proto`` and :mod:`services.gateway.file_job`."""
        async for response in self.files.serve(request_iterator, Deadline.after(context.time_remaining())):
            yield response
