"""The Gateway servicer: admits a call (stream limits, config checks), then runs a session or a file job."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from prometheus_client import Gauge

from parley.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.deadlines import Deadline
from services.common.errors import InvalidArgument
from services.common.streams import StreamSlots, bounded_requests, caller_key
from services.gateway.config import GatewayConfig
from services.gateway.downstream import Downstream
from services.gateway.file_job import FileJobSettings, FileTranslator
from services.gateway.session import StreamSession
from services.gateway.validation import StageCatalog, check_file_config, check_speech_config

logger = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name

# Time kept from the grace period for the streams' last events to reach their callers, in seconds.
DRAIN_MARGIN_S = 1.0

ACTIVE_STREAMS = Gauge("parley_gateway_active_streams", "TranslateSpeech streams in progress.")


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """``parley.gateway.v1.Gateway``.

    Args:
        config: Gateway configuration (stream limits, buffers, resilience policy).
        downstream: Guarded stubs of the four stages.
    """

    def __init__(self, config: GatewayConfig, downstream: Downstream):
        self.config = config
        self.downstream = downstream
        self.streams = StreamSlots(
            "TranslateSpeech",
            config.max_streams,
            "max_streams",
            per_caller=config.max_streams_per_caller,
            per_caller_field="max_streams_per_caller",
        )
        self.file_jobs = StreamSlots("TranslateFile", config.max_file_jobs, "max_file_jobs")
        self.sessions: set[StreamSession] = set()
        self.catalog = StageCatalog(downstream, config.catalog_ttl_s)
        self.files = FileTranslator(downstream, FileJobSettings(max_audio_s=config.max_file_s))

    async def TranslateSpeech(
        self,
        request_iterator: AsyncIterator[gateway_pb2.TranslateSpeechRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[gateway_pb2.TranslateSpeechResponse]:
        """Live speech translation; see ``gateway.proto`` and :mod:`services.gateway.session`.

        The whole config is checked before the first audio is read (:mod:`services.gateway.validation`).

        Raises:
            ResourceExhausted: ``max_streams`` streams are open, or ``max_streams_per_caller`` of the
                caller's.
            InvalidArgument: Audio before the config, a second config, a malformed config (format, language
                tags, output sample rate), DIRECT mode into a language other than English.
            FailedPrecondition: A language pair or voice the cluster does not serve.
            DeadlineExceeded: The client sent nothing for ``stream_idle_timeout_s``, or kept sending past
                ``max_stream_duration_s``.
        """
        with self.streams.hold(caller_key(context)):
            ACTIVE_STREAMS.inc()
            try:
                requests = bounded_requests(request_iterator, self.config)
                first = await anext(requests, None)
                if first is None:
                    raise InvalidArgument(
                        "the stream ended before its config: send a TranslateSpeechConfig first"
                    )
                if first.WhichOneof("request") != "config":
                    raise InvalidArgument(
                        "audio before the config: the first message must be a TranslateSpeechConfig"
                    )
                deadline = Deadline.after(context.time_remaining())
                mode = check_speech_config(first.config, self.config.direct_to_english)
                await self.catalog.check_speech(first.config, mode, deadline)
                session = StreamSession(self.config, self.downstream, first.config, deadline)
                self.sessions.add(session)
                try:
                    async for response in session.run(requests):
                        yield response
                finally:
                    self.sessions.discard(session)
            finally:
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
        """Subtitles for a whole recording; see ``gateway.proto`` and :mod:`services.gateway.file_job`.

        Raises:
            ResourceExhausted: ``max_file_jobs`` calls are in progress.
            InvalidArgument: No config first, a malformed config, a recording longer than ``max_file_s``.
            FailedPrecondition: A language pair the translation server does not serve.
            DeadlineExceeded: The client sent nothing for ``stream_idle_timeout_s``, or kept sending past
                ``max_stream_duration_s``.
        """
        with self.file_jobs.hold():
            deadline = Deadline.after(context.time_remaining())
            requests = bounded_requests(request_iterator, self.config)

            async def check(config: gateway_pb2.TranslateFileConfig) -> None:
                check_file_config(config)
                await self.catalog.check_file(config, deadline)

            async for response in self.files.serve(requests, deadline, check=check):
                yield response
