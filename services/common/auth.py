"""Bearer-token authentication: the tokens a server accepts, the interceptor that checks every call.

A caller sends the metadata ``authorization: Bearer <token>``. Status codes follow gRPC's conventions:
no ``authorization`` metadata, or one that is not ``Bearer <token>``, is UNAUTHENTICATED (the caller sent
no usable credentials; the message says what to send); a well-formed token the server does not know is
PERMISSION_DENIED. ``grpc.health.v1`` is always open (load balancers and ``parley health`` carry no token);
reflection is open unless ``--auth-reflection-open false``.

A token is compared with every configured one, each time in constant time (``hmac.compare_digest`` of
SHA-256 digests, so neither the content nor the length of a token leaks through timing). Tokens are never
logged; a refusal is logged at WARNING with the method, the peer and the reason.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import re
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.common.config import ConfigError
from services.common.handlers import same_kind

logger = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("parley_caller", default=None)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class _Entry:
    name: str | None
    digest: bytes


class Tokens:
    """The bearer tokens a server accepts, each with an optional name (the caller's identity in logs).

    Args:
        entries: ``(name, token)`` pairs; ``name`` is ``None`` for an unnamed token.

    Raises:
        ConfigError: No tokens, an empty token, or the same token twice.
    """

    def __init__(self, entries: Sequence[tuple[str | None, str]]):
        if not entries:
            raise ConfigError("no tokens given: authentication would accept nothing")
        digests = [_digest(token) for _, token in entries]
        if any(not token for _, token in entries):
            raise ConfigError("an empty token")
        if len(set(digests)) != len(digests):
            raise ConfigError("the same token is listed twice")
        self._entries = [_Entry(name, digest) for (name, _), digest in zip(entries, digests, strict=True)]

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, token: str) -> tuple[bool, str | None]:
        """Whether ``token`` is one of these, and its name (``None`` when unnamed or unknown).

        Every configured token is compared, in constant time, whatever matches first.
        """
        presented = _digest(token)
        found, name = False, None
        for entry in self._entries:
            if hmac.compare_digest(presented, entry.digest) and not found:
                found, name = True, entry.name
        return found, name


def parse_token_lines(lines: Iterable[str], source: str) -> list[tuple[str | None, str]]:
    """``(name, token)`` pairs from lines of ``token`` or ``name:token``; blank and ``#`` lines skipped.

    Args:
        lines: The lines (a file's, or the comma-separated entries of ``--auth-tokens``).
        source: Where the lines come from, for error messages (which never show a token).

    Raises:
        ConfigError: A line with an empty name or token, a name other than letters, digits, ``.``, ``_``
            and ``-``, or whitespace inside the token.
    """
    entries: list[tuple[str | None, str]] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name: str | None = None
        token = line
        if ":" in line:
            name, token = (part.strip() for part in line.split(":", 1))
            if not _NAME.fullmatch(name):
                raise ConfigError(
                    f"{source}, entry {number}: a token's name is letters, digits, '.', '_' or '-', "
                    "then ':' and the token"
                )
        if not token or any(c.isspace() for c in token):
            raise ConfigError(f"{source}, entry {number}: the token is empty or holds whitespace")
        entries.append((name, token))
    return entries


def load_tokens(tokens_file: str, tokens: Sequence[str]) -> Tokens | None:
    """The tokens of ``--auth-tokens-file`` and ``--auth-tokens`` together.

    Args:
        tokens_file: Path of the token file; empty: none.
        tokens: Entries of ``--auth-tokens`` (``PARLEY_AUTH_TOKENS``).

    Returns:
        The tokens, or ``None`` when neither is set (no authentication).

    Raises:
        ConfigError: The file cannot be read or lists no token, or an entry is malformed (see
            :func:`parse_token_lines`).
    """
    if not tokens_file and not tokens:
        return None
    entries = parse_token_lines(tokens, "--auth-tokens")
    if tokens_file:
        path = Path(tokens_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"--auth-tokens-file {tokens_file}: cannot read it ({exc.strerror})") from exc
        from_file = parse_token_lines(text.splitlines(), f"--auth-tokens-file {tokens_file}")
        if not from_file:
            raise ConfigError(f"--auth-tokens-file {tokens_file}: no token in the file")
        if path.stat().st_mode & stat.S_IROTH:
            logger.warning("--auth-tokens-file %s is readable by every user: chmod o-r it", tokens_file)
        entries += from_file
    return Tokens(entries)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents ``token`` (none for an empty token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def token_name() -> str | None:
    """The name of the current call's bearer token (``name:token`` entries), in its handler; else None.

    None on a server without tokens, and for an unnamed token. :func:`services.common.streams.caller_key`
    keys per-caller limits on it.
    """
    return _CALLER.get()


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type stubs: its base classes are Any
    """Refuses, before any handler runs, a call without one of ``tokens``; health (and reflection) are open.

    Args:
        tokens: The tokens accepted.
        reflection_open: Serve reflection without a token.
    """

    def __init__(self, tokens: Tokens, *, reflection_open: bool = True):
        self.tokens = tokens
        self.open_prefixes = (HEALTH_PREFIX, *(REFLECTION_PREFIXES if reflection_open else ()))

    def check(self, metadata: Iterable[tuple[str, Any]]) -> tuple[grpc.StatusCode | None, str, str | None]:
        """Judges a call's metadata.

        Returns:
            ``(None, "", name)`` for an accepted token (``name`` ``None`` when unnamed), else the status
            code and the message for the caller.
        """
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send the metadata 'authorization: Bearer <token>'",
                None,
            )
        scheme, _, token = str(values[0]).strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "malformed authorization metadata: expected 'Bearer <token>'",
                None,
            )
        found, name = self.tokens.match(token)
        if not found:
            return grpc.StatusCode.PERMISSION_DENIED, "the bearer token is not one this server accepts", None
        return None, "", name

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Returns a handler that refuses the call, or the method's own with the caller's identity set."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self.open_prefixes):
            return handler
        code, details, name = self.check(handler_call_details.invocation_metadata or ())
        streaming_response = bool(handler.response_streaming)
        if code is not None:
            refused = code

            async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
                logger.warning("%s refused from %s: %s (%s)", method, context.peer(), refused.name, details)
                await context.abort(refused, details)

            async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await refuse(request, context)
                yield  # never reached (abort raises): outer interceptors iterate a streaming response

            refusal = refuse_stream if streaming_response else refuse
            return same_kind(handler, refusal)

        behavior = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        )
        if streaming_response:

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                _CALLER.set(name)
                async for response in behavior(request, context):
                    yield response

            return same_kind(handler, stream)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _CALLER.set(name)
            return await behavior(request, context)

        return same_kind(handler, unary)
