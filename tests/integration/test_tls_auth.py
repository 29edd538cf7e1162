"""TLS, mutual TLS and bearer tokens on real server processes: a VAD stage and a gateway in front of it.

The certificates are made with the ``openssl`` commands docs/deploy.md shows: a CA, a server certificate for
``localhost`` and 127.0.0.1, a client certificate, and a second CA nobody trusts. The VAD server asks for
client certificates (mutual TLS); the gateway serves TLS, checks tokens, and reaches the VAD server over
mutual TLS (the STT, translation and TTS addresses lead nowhere: a silent stream only touches the VAD).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from parley.audio.v1 import audio_pb2
from parley.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.clients.cli import main as parley
from services.clients.cli import translate_file
from services.clients.cluster import check_health
from services.clients.media import write_wav
from services.common.auth import bearer_metadata
from services.common.tls import ClientTls, open_channel
from services.harness import ROOT, start_server

pytestmark = pytest.mark.timeout(120)

RATE = 16000
TOKEN = "3f1c0de5a7b94e2c9d8e7f6a5b4c3d2e"
UNNAMED_TOKEN = "b7a9e3c1d5f24680aceb13579bdf2468"
NOWHERE = "127.0.0.1:1"  # nothing listens: the stages a silent stream never calls


def openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> None:
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip


def make_cert(folder: Path, name: str, ca: str, extensions: str) -> None:
    (folder / f"{name}.ext").write_text(extensions)
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        cwd=folder,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is missing: it makes the test certificates")
    folder = tmp_path_factory.mktemp("pki")
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    make_cert(
        folder,
        "server",
        "ca",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    make_cert(folder, "client", "ca", "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
    tokens = folder / "tokens"
    tokens.write_text(f"# callers of the test gateway\nalice:{TOKEN}\n\n{UNNAMED_TOKEN}\n")
    tokens.chmod(0o600)
    return folder


def server_tls(pki: Path) -> tuple[str, ...]:
    return ("--tls-cert-file", str(pki / "server.pem"), "--tls-key-file", str(pki / "server.key"))


@pytest.fixture(scope="module")
def vad(pki):
    server = start_server("vad", *server_tls(pki), "--tls-client-ca-file", str(pki / "ca.pem"), timeout_s=60)
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def gateway(pki, vad):
    server = start_server(
        "gateway",
        *server_tls(pki),
        "--auth-tokens-file",
        str(pki / "tokens"),
        "--vad-address",
        vad.address,
        *("--stt-address", NOWHERE, "--translate-address", NOWHERE, "--tts-address", NOWHERE),
        "--stage-tls-ca-file",
        str(pki / "ca.pem"),
        "--stage-tls-cert-file",
        str(pki / "client.pem"),
        "--stage-tls-key-file",
        str(pki / "client.key"),
        timeout_s=60,
    )
    yield server
    server.terminate()


def localhost(address: str) -> str:
    """The address by name: the certificate names ``localhost`` (and 127.0.0.1)."""
    return "localhost:" + address.rsplit(":", 1)[1]


async def health(address: str, tls: ClientTls | None) -> str:
    try:
        async with open_channel(address, tls) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def test_mutual_tls_server_serves_a_client_with_a_certificate(pki, vad):
    tls = ClientTls(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
    assert await health(localhost(vad.address), tls) == "SERVING"
    assert await health(vad.address, tls) == "SERVING"  # the certificate names 127.0.0.1 too
    assert "(mutual TLS, no authentication)" in vad.log()


async def test_mutual_tls_server_refuses_plaintext_a_wrong_ca_and_no_certificate(pki, vad):
    address = localhost(vad.address)
    assert await health(address, None) == "UNAVAILABLE"
    wrong_ca = ClientTls(str(pki / "other-ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
    assert await health(address, wrong_ca) == "UNAVAILABLE"
    assert await health(address, ClientTls(str(pki / "ca.pem"))) == "UNAVAILABLE"


def test_parley_health_talks_tls(pki, vad, gateway, capsys):
    address = localhost(vad.address)
    client = ("--tls-cert-file", str(pki / "client.pem"), "--tls-key-file", str(pki / "client.key"))
    assert parley(["health", address, "--tls-ca-file", str(pki / "ca.pem"), *client]) == 0
    assert parley(["health", address]) == 1
    assert capsys.readouterr().out.split() == ["SERVING", "UNAVAILABLE"]
    # The gateway is TLS without client certificates, and health needs no token.
    tls = ClientTls(str(pki / "ca.pem"), server_name="localhost")
    assert check_health(gateway.address, tls=tls) == "SERVING"


async def test_gateway_refuses_a_plaintext_client_and_a_wrong_ca(pki, gateway):
    assert await health(gateway.address, None) == "UNAVAILABLE"
    assert await health(localhost(gateway.address), ClientTls(str(pki / "other-ca.pem"))) == "UNAVAILABLE"
    assert await health(localhost(gateway.address), ClientTls(str(pki / "ca.pem"))) == "SERVING"


def speech_config() -> gateway_pb2.TranslateSpeechConfig:
    return gateway_pb2.TranslateSpeechConfig(
        request_id="tls-auth",
        source_language="en",
        target_language="fr",
        input_format=audio_pb2.AudioFormat(encoding=audio_pb2.PCM_S16LE, sample_rate_hz=RATE, channels=1),
    )


async def translate_silence(
    address: str, tls: ClientTls, metadata
) -> list[gateway_pb2.TranslateSpeechResponse]:
    async def requests():
        yield gateway_pb2.TranslateSpeechRequest(config=speech_config())
        yield gateway_pb2.TranslateSpeechRequest(audio=np.zeros(RATE, "<i2").tobytes())

    async with open_channel(address, tls) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).TranslateSpeech(
            requests(), metadata=metadata, timeout=30
        )
        return [response async for response in call]


@pytest.mark.parametrize(
    ("metadata", "code", "message"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED, "send the metadata 'authorization: Bearer <token>'"),
        ((("authorization", f"Basic {TOKEN}"),), grpc.StatusCode.UNAUTHENTICATED, "malformed"),
        (bearer_metadata("not-a-token-this-gateway-knows"), grpc.StatusCode.PERMISSION_DENIED, "not one"),
    ],
)
async def test_gateway_refuses_calls_without_a_known_token(pki, gateway, metadata, code, message):
    async def nothing():
        # Headers only: the refusal needs no message, and a write racing the refusal would meet grpc's
        # aio bug (grpc/grpc#36066: the client then reports INTERNAL instead of the server's status).
        await asyncio.Event().wait()
        yield

    async with open_channel(localhost(gateway.address), ClientTls(str(pki / "ca.pem"))) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).TranslateSpeech(nothing(), metadata=metadata, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
    assert info.value.code() == code
    assert message in info.value.details()
    log = gateway.log()
    assert "refused from ipv4:127.0.0.1" in log and code.name in log
    assert "Traceback" not in log
    assert TOKEN not in log and "not-a-token-this-gateway-knows" not in log


@pytest.mark.parametrize("token", [TOKEN, UNNAMED_TOKEN])
async def test_a_known_token_reaches_the_tls_vad_stage_through_the_gateway(pki, gateway, token):
    responses = await translate_silence(
        localhost(gateway.address), ClientTls(str(pki / "ca.pem")), bearer_metadata(token)
    )
    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds == ["end_of_stream"], responses  # no error event: the VAD stage answered over mutual TLS
    assert responses[-1].end_of_stream.utterances == 0
    assert "(TLS, bearer tokens: 2)" in gateway.log()


async def test_reflection_stays_open_without_a_token(pki, gateway):
    async with open_channel(localhost(gateway.address), ClientTls(str(pki / "ca.pem"))) as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=10)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        response = await call.read()
        await call.done_writing()
    names = {s.name for s in response.list_services_response.service}
    assert "parley.gateway.v1.Gateway" in names


async def test_translate_speech_sends_the_token_over_tls(pki, gateway):
    doc = await translate_file(
        localhost(gateway.address),
        np.zeros(RATE, "<i2").tobytes(),
        source="en",
        target="fr",
        tls=ClientTls(str(pki / "ca.pem")),
        token=TOKEN,
        live=False,
        timeout_s=30,
    )
    assert doc["end_of_stream"] and doc["utterances"] == []


def test_parley_subtitles_sends_the_token_from_the_environment_over_tls(pki, gateway, tmp_path):
    silence = tmp_path / "silence.wav"
    write_wav(silence, np.zeros(RATE, "<i2").tobytes(), RATE)
    argv = ["subtitles", str(silence), "--server", localhost(gateway.address), "--no-progress"]
    # Its own process: gRPC aio keeps to one event loop per process.
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *argv, "--tls-ca-file", str(pki / "ca.pem")],
        cwd=ROOT,
        env={**os.environ, "PARLEY_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "no speech found" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--tls-cert-file", "{pki}/server.pem"), "--tls-cert-file and --tls-key-file go together"),
        (
            ("--tls-cert-file", "{pki}/server.pem", "--tls-key-file", "{pki}/nope.key"),
            "--tls-key-file .*nope.key: cannot read it",
        ),
        (("--auth-tokens-file", "{pki}/nope"), "--auth-tokens-file .*nope: cannot read it"),
    ],
)
def test_a_bad_setting_stops_the_server_with_one_clear_line(pki, flags, message):
    with pytest.raises(RuntimeError) as info:
        start_server("gateway", *(f.format(pki=pki) for f in flags), timeout_s=60)
    text = str(info.value)
    assert "exited with 2" in text
    assert re.search(f"ERROR services.common.server: gateway: cannot start: {message}", text), text
    assert "Traceback" not in text
