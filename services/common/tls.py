"""TLS for servers and for the channels clients open: credentials from PEM files, checked at start-up.

A server presents ``--tls-cert-file`` and ``--tls-key-file``; with ``--tls-client-ca-file`` it also asks
every client for a certificate chaining to that CA (mutual TLS) and refuses the handshake without one. A
client verifies the server against a CA bundle (:class:`ClientTls`), optionally presents its own
certificate, and opens its channel with :func:`open_channel` (or :func:`open_sync_channel`), the one place
that picks a secure or a plaintext channel. Files are read once, when the server or channel starts: a
renewed certificate takes effect on restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.common.config import ConfigError

_CERTIFICATE = b"CERTIFICATE-----"
_PRIVATE_KEY = b"PRIVATE KEY-----"


def _read_pem(path: str, label: str, marker: bytes) -> bytes:
    """The bytes of a PEM file, checked to hold a ``marker`` block (a certificate or a private key).

    Raises:
        ConfigError: The file cannot be read, or holds no such PEM block.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{label} {path}: cannot read it ({exc.strerror or exc})") from exc
    if b"-----BEGIN " not in data or marker not in data:
        kind = "certificate" if marker == _CERTIFICATE else "private key"
        raise ConfigError(f"{label} {path}: no PEM {kind} in the file")
    return data


def server_credentials(cert_file: str, key_file: str, client_ca_file: str) -> grpc.ServerCredentials | None:
    """Server credentials from ``--tls-cert-file``, ``--tls-key-file`` and ``--tls-client-ca-file``.

    Args:
        cert_file: PEM certificate chain the server presents; empty with ``key_file``: plaintext.
        key_file: PEM private key of ``cert_file``.
        client_ca_file: PEM CA bundle client certificates must chain to; set: mutual TLS (a client
            certificate is required). Empty: clients are not asked for one.

    Returns:
        The credentials for ``add_secure_port``, or ``None`` for plaintext (all three empty).

    Raises:
        ConfigError: Only one of the certificate and the key is given, a client CA without them, or a file
            that cannot be read or holds no PEM certificate (key).
    """
    if not (cert_file or key_file or client_ca_file):
        return None
    if bool(cert_file) != bool(key_file):
        raise ConfigError("--tls-cert-file and --tls-key-file go together: TLS needs both")
    if not cert_file:
        raise ConfigError("--tls-client-ca-file (mutual TLS) needs --tls-cert-file and --tls-key-file")
    chain = _read_pem(cert_file, "--tls-cert-file", _CERTIFICATE)
    key = _read_pem(key_file, "--tls-key-file", _PRIVATE_KEY)
    client_ca = _read_pem(client_ca_file, "--tls-client-ca-file", _CERTIFICATE) if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


@dataclass(frozen=True)
class ClientTls:
    """How a client channel verifies its server and, for mutual TLS, proves who it is.

    Build it with :func:`client_tls`, which checks the settings go together.

    Attributes:
        ca_file: PEM CA bundle the server's certificate must chain to.
        cert_file: PEM certificate chain presented to a mutual-TLS server; empty: none.
        key_file: PEM private key of ``cert_file``.
        server_name: Name checked against the server's certificate instead of the target's host
            (an address by IP, or a test certificate); empty: the target's host.
    """

    ca_file: str
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads the files into channel credentials.

        Raises:
            ConfigError: A file cannot be read or holds no PEM certificate (key).
        """
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca_file, "TLS CA file", _CERTIFICATE),
            private_key=_read_pem(self.key_file, "TLS client key", _PRIVATE_KEY) if self.key_file else None,
            certificate_chain=(
                _read_pem(self.cert_file, "TLS client certificate", _CERTIFICATE) if self.cert_file else None
            ),
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel options: the server-name override, when set."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def client_tls(
    ca_file: str, cert_file: str = "", key_file: str = "", server_name: str = "", *, flag_prefix: str
) -> ClientTls | None:
    """Client TLS settings from a caller's flags (``<flag_prefix>ca-file``, ``cert-file``, ...), checked.

    Args:
        ca_file: PEM CA bundle that verifies the server; set: TLS. Empty (and the rest empty): plaintext.
        cert_file: PEM client certificate chain, for mutual TLS.
        key_file: PEM private key of ``cert_file``.
        server_name: Name checked against the server's certificate instead of the target's host.
        flag_prefix: How the caller's flags start (``"--tls-"``, ``"--stage-tls-"``), for error messages.

    Returns:
        The settings, or ``None`` for a plaintext channel.

    Raises:
        ConfigError: Settings without the CA file, or only one of the certificate and the key.
    """
    if not ca_file:
        if cert_file or key_file or server_name:
            p = flag_prefix
            raise ConfigError(f"{p}cert-file, {p}key-file and {p}server-name need {p}ca-file (TLS)")
        return None
    if bool(cert_file) != bool(key_file):
        raise ConfigError(f"{flag_prefix}cert-file and {flag_prefix}key-file go together")
    return ClientTls(ca_file, cert_file, key_file, server_name)


def open_channel(
    target: str,
    tls: ClientTls | None,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to ``target``: TLS with ``tls``, plaintext when it is ``None``.

    Raises:
        ConfigError: A TLS file cannot be read or holds no PEM certificate (key).
    """
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(
        target, tls.credentials(), options=[*options, *tls.options()], interceptors=interceptors
    )


def open_sync_channel(
    target: str, tls: ClientTls | None, *, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A blocking channel to ``target``: TLS with ``tls``, plaintext when it is ``None``.

    Raises:
        ConfigError: A TLS file cannot be read or holds no PEM certificate (key).
    """
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])
