"""The flags every client command shares: the gateway's default address, TLS (``--tls-*``) and ``--token``."""

from __future__ import annotations

import argparse
import os

from services.common.config import DEFAULT_PORTS, ConfigError
from services.common.tls import ClientTls, client_tls

DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORTS['gateway']}"


def add_client_security_args(parser: argparse.ArgumentParser, *, token: bool = True) -> None:
    """Adds the flags of a client's TLS (``--tls-*``) and, unless ``token`` is false, ``--token``."""
    parser.add_argument(
        "--tls-ca-file",
        default="",
        help="PEM CA bundle that verifies the server; set: TLS (default: plaintext)",
    )
    parser.add_argument("--tls-cert-file", default="", help="PEM client certificate, for a mutual-TLS server")
    parser.add_argument("--tls-key-file", default="", help="PEM private key of --tls-cert-file")
    parser.add_argument(
        "--tls-server-name", default="", help="name the server's certificate must carry; default: the host"
    )
    if token:
        parser.add_argument(
            "--token",
            default=os.environ.get("PARLEY_TOKEN", ""),
            help="bearer token for the gateway; default: env PARLEY_TOKEN, else none",
        )


def client_security(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ClientTls | None:
    """The TLS settings of :func:`add_client_security_args`'s flags; a usage error when they do not fit."""
    try:
        return client_tls(
            args.tls_ca_file,
            args.tls_cert_file,
            args.tls_key_file,
            args.tls_server_name,
            flag_prefix="--tls-",
        )
    except ConfigError as exc:
        parser.error(str(exc))
