"""Typed configuration from command-line flags and ``PARLEY_*`` environment variables.

Every stage has one frozen dataclass deriving from :class:`ServerConfig`. Each field's ``metadata["help"]``
documents it (with its unit); ``load_config`` builds an argparse parser from the fields, so ``--help`` shows
every default. Precedence: flag, then environment variable ``PARLEY_<FIELD_NAME>``, then the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

# The port of each stage in a cluster: ``parley up``, the gateway's default stage addresses, the compose files
# and the Kubernetes manifests (a stage started alone defaults to port 0, a free one).
DEFAULT_PORTS = {"gateway": 50051, "vad": 50052, "stt": 50053, "translate": 50054, "tts": 50055}


def option(default: Any, help: str, *, secret: bool = False) -> Any:  # noqa: A002 - argparse's keyword
    """A dataclass field with its help text (say the unit); ``secret``: its value never shows in --help."""
    return dataclasses.field(default=default, metadata={"help": help, "secret": secret})


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Settings every stage server shares."""

    host: str = option("127.0.0.1", "Address to bind; 0.0.0.0 to listen on every interface.")
    port: int = option(0, "gRPC port; 0 picks a free one (written to --ready-file).")
    metrics_port: int = option(0, "Prometheus metrics HTTP port; 0 disables the endpoint.")
    grace_s: float = option(10.0, "On SIGTERM, time in-flight calls get to finish, in seconds.")
    drain_delay_s: float = option(
        0.5, "On SIGTERM, time spent NOT_SERVING but still accepting calls, so balancers move away, in s."
    )
    log_level: str = option("INFO", "Logging level: DEBUG, INFO, WARNING or ERROR.")
    max_message_mb: int = option(64, "Largest gRPC message accepted or sent, in MiB.")
    ready_file: str = option("", "Once SERVING, write 'host:port' to this file (for supervisors).")
    tls_cert_file: str = option(
        "", "PEM certificate chain this server presents; with --tls-key-file: TLS. Empty: plaintext."
    )
    tls_key_file: str = option("", "PEM private key of --tls-cert-file (unencrypted).")
    tls_client_ca_file: str = option(
        "",
        "PEM CA bundle client certificates must chain to; set: mutual TLS, a client without such a "
        "certificate is refused at the handshake. Empty: no client certificate asked for.",
    )
    auth_tokens_file: str = option(
        "",
        "File of the bearer tokens accepted: one 'token' or 'name:token' a line, '#' starts a comment "
        "line. With tokens (here or --auth-tokens), a call without 'authorization: Bearer <token>' is "
        "refused; health is always open. Empty and no --auth-tokens: no authentication.",
    )
    auth_tokens: tuple[str, ...] = option(
        (),
        "Bearer tokens accepted, comma-separated 'token' or 'name:token' (prefer the env var or a file).",
        secret=True,
    )
    auth_reflection_open: bool = option(
        True, "With tokens, serve reflection without one (it lists the API, no data); false: token needed."
    )


@dataclasses.dataclass(frozen=True)
class StreamLimitsConfig:
    """Limits of client-streaming calls: a mixin for stage configs.

    Use as ``class VadConfig(StreamLimitsConfig, BatchingConfig, ServerConfig)``; a stage may redeclare a
    field to change its default (the gateway serves fewer streams).
    """

    max_streams: int = option(
        64, "Client-streaming calls served at once; past it, new ones fail RESOURCE_EXHAUSTED at once."
    )
    stream_idle_timeout_s: float = option(
        30.0,
        "A stream whose client sends no message for this long ends with DEADLINE_EXCEEDED, in seconds "
        "(live audio arrives every few tens of ms, silence included); 0 for no limit.",
    )
    max_stream_duration_s: float = option(
        4 * 3600.0,
        "Longest a client may keep sending on one stream, from its first message to its half-close, in "
        "seconds (default 4 h); past it the stream ends with DEADLINE_EXCEEDED; 0 for no limit.",
    )


class ConfigError(ValueError):
    """A setting is invalid, or names a file the server cannot use; raised at start-up, before serving."""


def env_var(field_name: str) -> str:
    """Environment variable that sets a config field, e.g. ``PARLEY_METRICS_PORT``."""
    return "PARLEY_" + field_name.upper()


def flag(field_name: str) -> str:
    """Command-line flag that sets a config field, e.g. ``--metrics-port``."""
    return "--" + field_name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Unwraps ``Optional[X]``; returns (X, is_optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_value(tp: Any, raw: str) -> Any:
    tp, optional = _base_type(tp)
    if optional and raw == "":
        return None
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(raw.lower())
        except ValueError:
            choices = ", ".join(m.value for m in tp)
            raise ValueError(f"expected one of {choices}, got {raw!r}") from None
    if typing.get_origin(tp) is tuple:
        (item,) = typing.get_args(tp)[:1]
        return tuple(_parse_value(item, part.strip()) for part in raw.split(",") if part.strip())
    return tp(raw)


def _show(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _add_flag(
    parser: argparse.ArgumentParser,
    field: dataclasses.Field[Any],
    tp: Any,
    env: Mapping[str, str],
    secrets: dict[str, Any],
) -> None:
    """Adds the flag of one config field; its default is the environment's value, else the field's.

    A secret field's value goes into ``secrets`` instead of the flag's default, so ``--help`` never shows it.
    """
    default = field.default
    help_text = f"{field.metadata.get('help', '')} Env: {env_var(field.name)}."
    raw_env = env.get(env_var(field.name))
    if raw_env is not None:
        try:
            default = _parse_value(tp, raw_env)
        except ValueError as exc:
            parser.error(f"{env_var(field.name)}: {exc}")
    base, _ = _base_type(tp)
    choices = [m.value for m in base] if isinstance(base, type) and issubclass(base, enum.Enum) else None
    if field.metadata.get("secret"):
        secrets[field.name] = default
        default = None  # the value itself stays out of --help
        help_text += " Its value is never shown here."
    parser.add_argument(
        flag(field.name),
        dest=field.name,
        default=_show(default) if default is not None else None if field.name in secrets else "",
        metavar=field.name.upper(),
        choices=choices,
        help=help_text,
    )


def load_config(
    cls: type[T],
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> T:
    """Builds ``cls`` from flags, then ``PARLEY_*`` environment variables, then defaults.

    Args:
        cls: A frozen dataclass whose fields carry ``metadata["help"]``.
        argv: Arguments without the program name; ``None`` reads ``sys.argv[1:]``.
        env: Environment; ``None`` reads ``os.environ``.
        prog: Program name shown by ``--help``.

    Raises:
        SystemExit: On a bad flag or environment value (argparse's usage error, exit code 2).
    """
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(cls.__doc__ or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    secrets: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        _add_flag(parser, field, hints[field.name], env, secrets)
    args = parser.parse_args(argv)
    values = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = getattr(args, field.name)
        if raw is None and field.name in secrets:
            values[field.name] = secrets[field.name]
            continue
        try:
            values[field.name] = _parse_value(hints[field.name], raw)
        except ValueError as exc:
            parser.error(f"{flag(field.name)}: {exc}")
    return cls(**values)
