"""Bearer tokens: parsing the file and the env var, the constant-time match, the interceptor's verdicts."""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass

import grpc
import pytest

from services.common import auth
from services.common.auth import (
    TokenAuthInterceptor,
    Tokens,
    bearer_metadata,
    load_tokens,
    parse_token_lines,
)
from services.common.config import ConfigError, ServerConfig, load_config
from services.common.streams import caller_key


def test_lines_skip_blanks_and_comments_and_split_names():
    lines = ["# operators", "", "  alice:tok-a  ", "tok-b", "   # indented comment", "ci.bot-1 : tok-c"]
    assert parse_token_lines(lines, "f") == [("alice", "tok-a"), (None, "tok-b"), ("ci.bot-1", "tok-c")]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("alice:", "empty"),
        (":tok", "name"),
        ("al ice:tok", "name"),
        ("to k", "whitespace"),
        ("alice:to k", "whitespace"),
    ],
)
def test_malformed_lines_are_refused_without_showing_the_token(line, reason):
    with pytest.raises(ConfigError, match=reason) as info:
        parse_token_lines(["# first", line], "--auth-tokens-file t")
    assert "entry 2" in str(info.value)
    assert "tok" not in str(info.value).replace("token", "")


def test_tokens_refuse_nothing_empty_and_duplicates():
    with pytest.raises(ConfigError, match="no tokens"):
        Tokens([])
    with pytest.raises(ConfigError, match="empty"):
        Tokens([("a", "")])
    with pytest.raises(ConfigError, match="twice"):
        Tokens([("a", "same"), ("b", "same")])
    assert len(Tokens([("alice", "old"), ("alice", "new")])) == 2  # one caller, two tokens: rotation


def test_match_names_the_token_and_refuses_others():
    tokens = Tokens([("alice", "tok-a"), (None, "tok-b")])
    assert tokens.match("tok-a") == (True, "alice")
    assert tokens.match("tok-b") == (True, None)
    assert tokens.match("tok-c") == (False, None)
    assert tokens.match("tok-a ") == (False, None)
    assert tokens.match("tok") == (False, None)


def test_match_compares_every_token_in_constant_time(monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", compare)
    tokens = Tokens([("a", "first"), ("b", "second"), ("c", "a-much-longer-third-token")])
    for presented in ("first", "a-much-longer-third-token", "unknown", "x"):
        calls.clear()
        tokens.match(presented)
        assert len(calls) == 3, presented  # no early exit on a match
        assert all(len(a) == len(b) == 32 for a, b in calls)  # digests: the length does not leak


def test_load_tokens_joins_the_file_and_the_env_var(tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text("# callers\nalice:tok-a\ntok-b\n")
    path.chmod(0o600)
    config = load_config(ServerConfig, [], env={"PARLEY_AUTH_TOKENS": "ci:tok-c, tok-d"})
    assert config.auth_tokens == ("ci:tok-c", "tok-d")
    with caplog.at_level(logging.WARNING):
        tokens = load_tokens(str(path), config.auth_tokens)
    assert tokens is not None and len(tokens) == 4
    assert tokens.match("tok-c") == (True, "ci")
    assert tokens.match("tok-a") == (True, "alice")
    assert not caplog.records
    assert load_tokens("", ()) is None


def test_load_tokens_refuses_an_empty_or_missing_file_and_warns_when_others_can_read_it(tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n\n")
    with pytest.raises(ConfigError, match="no token in the file"):
        load_tokens(str(empty), ())
    with pytest.raises(ConfigError, match="cannot read it"):
        load_tokens(str(tmp_path / "missing"), ())
    readable = tmp_path / "readable"
    readable.write_text("secret-token\n")
    readable.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        load_tokens(str(readable), ())
    assert "readable by every user" in caplog.text
    assert "secret-token" not in caplog.text


def test_bearer_metadata():
    assert bearer_metadata("abc") == (("authorization", "Bearer abc"),)
    assert bearer_metadata("") == ()


@pytest.mark.parametrize(
    ("metadata", "code", "message"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED, "authorization: Bearer <token>"),
        ((("x-other", "1"),), grpc.StatusCode.UNAUTHENTICATED, "authorization: Bearer <token>"),
        ((("authorization", "Basic dXNlcjpwdw=="),), grpc.StatusCode.UNAUTHENTICATED, "malformed"),
        ((("authorization", "Bearer"),), grpc.StatusCode.UNAUTHENTICATED, "malformed"),
        ((("authorization", "Bearer wrong"),), grpc.StatusCode.PERMISSION_DENIED, "not one"),
        ((("authorization", "Bearer tok-a"),), None, ""),
        ((("authorization", "bearer  tok-a "),), None, ""),  # the scheme is case-insensitive (RFC 6750)
    ],
)
def test_check_follows_grpc_conventions(metadata, code, message):
    interceptor = TokenAuthInterceptor(Tokens([("alice", "tok-a")]))
    got_code, details, name = interceptor.check(metadata)
    assert got_code == code
    assert message in details
    assert name == ("alice" if code is None else None)


class FakeContext:
    def __init__(self, peer: str):
        self._peer = peer
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


@dataclass
class CallDetails:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


async def run_call(interceptor: TokenAuthInterceptor, method: str, metadata, peer: str):
    async def behavior(request, context):
        await asyncio.sleep(0.01)  # let the other calls run: each must keep its own identity
        return caller_key(context)  # what the gateway's per-caller stream limit keys on

    async def continuation(_):
        return grpc.unary_unary_rpc_method_handler(behavior)

    handler = await interceptor.intercept_service(continuation, CallDetails(method, metadata))
    context = FakeContext(peer)
    try:
        return await handler.unary_unary(None, context)
    except grpc.aio.AbortError:
        return context.aborted


async def test_interceptor_refuses_before_the_handler_and_hands_it_the_caller(caplog):
    interceptor = TokenAuthInterceptor(Tokens([("alice", "tok-a"), (None, "tok-b")]), reflection_open=False)
    method = "/parley.gateway.v1.Gateway/TranslateSpeech"
    with caplog.at_level(logging.WARNING):
        results = await asyncio.gather(
            run_call(interceptor, method, bearer_metadata("tok-a"), "ipv4:10.0.0.1:1"),
            run_call(interceptor, method, bearer_metadata("tok-b"), "ipv4:10.0.0.2:2"),
            run_call(interceptor, method, bearer_metadata("tok-x"), "ipv4:10.0.0.3:3"),
            run_call(interceptor, method, (), "ipv4:10.0.0.4:4"),
            run_call(interceptor, "/grpc.health.v1.Health/Check", (), "ipv4:10.0.0.5:5"),
            run_call(interceptor, "/grpc.reflection.v1alpha.ServerReflection/X", (), "ipv4:10.0.0.6:6"),
        )
    assert results[0] == "token:alice"
    assert results[1] == "10.0.0.2"  # an unnamed token: the peer's host
    assert results[2][0] is grpc.StatusCode.PERMISSION_DENIED
    assert results[3][0] is grpc.StatusCode.UNAUTHENTICATED
    assert results[4] == "10.0.0.5"  # health is open
    assert results[5][0] is grpc.StatusCode.UNAUTHENTICATED  # reflection closed by the flag
    refusals = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refusals) == 3 and all(r.exc_info is None for r in refusals)
    assert "ipv4:10.0.0.3:3" in caplog.text and "PERMISSION_DENIED" in caplog.text
    assert "tok-x" not in caplog.text


async def test_reflection_is_open_by_default():
    interceptor = TokenAuthInterceptor(Tokens([("alice", "tok-a")]))
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    assert await run_call(interceptor, method, (), "ipv4:10.0.0.6:6") == "10.0.0.6"


def test_tokens_from_the_environment_never_show_in_help(capsys):
    from services.common.config import load_config
    from services.vad.config import VadConfig

    env = {"PARLEY_AUTH_TOKENS": "alice:s3cret-value"}
    assert load_config(VadConfig, [], env=env).auth_tokens == ("alice:s3cret-value",)
    assert load_config(VadConfig, ["--auth-tokens", "bob:other"], env=env).auth_tokens == ("bob:other",)
    with pytest.raises(SystemExit):
        load_config(VadConfig, ["--help"], env=env)
    assert "s3cret-value" not in capsys.readouterr().out
