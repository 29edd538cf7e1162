"""Rebuilding a gRPC method handler around new behaviour: what every server interceptor here does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


def same_kind(
    handler: grpc.RpcMethodHandler,
    behavior: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind (unary or streaming request and response) that runs ``behavior``.

    Args:
        handler: The method's handler, as an interceptor's continuation returned it.
        behavior: The new behaviour: a coroutine function for unary responses, an async generator
            function for streaming ones, taking ``(request or request iterator, context)``.
        request_deserializer: Replaces the handler's own; None keeps it.
    """
    if handler.request_streaming:
        factory = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
    else:
        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
    return factory(
        behavior,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
