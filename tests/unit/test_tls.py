"""TLS settings: which combinations start, and the errors for those that do not (no sockets)."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError
from services.common.tls import ClientTls, client_tls, server_credentials
from services.gateway.config import GatewayConfig
from services.gateway.downstream import stage_tls

# Any PEM block of the right kind passes the start-up check; gRPC parses it when the port is added.
CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def pem(tmp_path):
    (tmp_path / "cert.pem").write_text(CERT)
    (tmp_path / "key.pem").write_text(KEY)
    (tmp_path / "not-pem").write_text("hello\n")
    return tmp_path


def test_plaintext_when_nothing_is_set():
    assert server_credentials("", "", "") is None
    assert client_tls("", flag_prefix="--tls-") is None


@pytest.mark.parametrize(
    ("cert", "key", "client_ca", "message"),
    [
        ("cert.pem", "", "", "--tls-cert-file and --tls-key-file go together"),
        ("", "key.pem", "", "--tls-cert-file and --tls-key-file go together"),
        ("", "", "cert.pem", r"--tls-client-ca-file \(mutual TLS\) needs"),
        ("missing.pem", "key.pem", "", "--tls-cert-file .*missing.pem: cannot read it"),
        ("cert.pem", "missing.pem", "", "--tls-key-file .*missing.pem: cannot read it"),
        ("not-pem", "key.pem", "", "--tls-cert-file .*not-pem: no PEM certificate"),
        ("cert.pem", "cert.pem", "", "--tls-key-file .*: no PEM private key"),
        ("cert.pem", "key.pem", "missing.pem", "--tls-client-ca-file .*missing.pem"),
    ],
)
def test_server_settings_that_cannot_start_say_why(pem, cert, key, client_ca, message):
    def at(name: str) -> str:
        return str(pem / name) if name else ""

    with pytest.raises(ConfigError, match=message):
        server_credentials(at(cert), at(key), at(client_ca))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"stage_tls_cert_file": "c", "stage_tls_key_file": "k"}, "need --stage-tls-ca-file"),
        ({"stage_tls_server_name": "vad"}, "need --stage-tls-ca-file"),
        ({"stage_tls_ca_file": "ca", "stage_tls_cert_file": "c"}, "--stage-tls-key-file go together"),
    ],
)
def test_gateway_stage_tls_settings_are_checked_with_their_flag_names(settings, message):
    with pytest.raises(ConfigError, match=message):
        stage_tls(GatewayConfig(**settings))


def test_gateway_stage_tls_settings():
    assert stage_tls(GatewayConfig()) is None
    config = GatewayConfig(
        stage_tls_ca_file="ca", stage_tls_cert_file="c", stage_tls_key_file="k", stage_tls_server_name="vad"
    )
    tls = stage_tls(config)
    assert tls == ClientTls("ca", "c", "k", "vad")
    assert tls.options() == [("grpc.ssl_target_name_override", "vad")]
    assert ClientTls("ca").options() == []


def test_client_files_are_read_when_the_channel_opens(pem):
    with pytest.raises(ConfigError, match="TLS CA file .*missing.pem: cannot read it"):
        ClientTls(str(pem / "missing.pem")).credentials()
    with pytest.raises(ConfigError, match="TLS client key .*: no PEM private key"):
        ClientTls(str(pem / "cert.pem"), str(pem / "cert.pem"), str(pem / "cert.pem")).credentials()
    assert ClientTls(str(pem / "cert.pem"), str(pem / "cert.pem"), str(pem / "key.pem")).credentials()
