"""The deployment stack: docker-compose.yml, the Dockerfile and deploy/, checked structurally (always), with
``docker compose config`` (when a compose CLI is installed), and natively: the same MLflow basic-auth server on
PostgreSQL and a real Ray head started from the compose services' commands, and ``rpsft sweep --address`` run
against them with the stack's credentials."""

from __future__ import annotations

import base64
import configparser
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from conftest import PAPER_DATA
from sweep_helpers import drop_pg_schema, pg_available, pg_schema, sweep_dict, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
ENV_EXAMPLE = REPO / "deploy" / ".env.example"
BIN = Path(sys.executable).parent
SERVICES = ("postgres", "mlflow", "ray-head", "ray-worker", "rpsft")
RAY_SERVICES = ("ray-head", "ray-worker", "rpsft")  # every Ray node, and the driver node
LIBPQ_ENV = {"PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGPASSFILE", "PGSSLMODE", "PGOPTIONS"}
VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


# ----------------------------------------------------------------------------------------------- helpers


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` substitution, recursively (``env`` overrides the defaults)."""
    env = env or {}
    if isinstance(value, str):
        return VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict[str, Any]:
    """The compose file with every variable at its default."""
    return interpolate(raw_compose)


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    return compose["services"][name]


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def as_list(cmd: Any) -> list[str]:
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def option(cmd: list[str], name: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` in a command line."""
    for i, token in enumerate(cmd):
        if token == name and i + 1 < len(cmd):
            return cmd[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def with_options(cmd: list[str], values: dict[str, str | None]) -> list[str]:
    """``cmd`` with the given options replaced (``None``: removed) or appended; flags keep their form."""
    out, i, seen = [], 0, set()
    while i < len(cmd):
        token = cmd[i]
        name = token.split("=", 1)[0]
        if name in values:
            seen.add(name)
            has_value = "=" not in token and i + 1 < len(cmd) and not cmd[i + 1].startswith("--")
            i += 2 if has_value else 1
            if values[name] is not None:
                out += [name, values[name]]
            continue
        out.append(token)
        i += 1
    for name, value in values.items():
        if name not in seen and value is not None:
            out += [name] if value == "" else [name, value]
    return out


def volume_mounts(svc: dict[str, Any]) -> dict[str, str]:
    """``{container path: source}`` of a service's volumes (short syntax)."""
    out = {}
    for item in svc.get("volumes") or []:
        parts = item.split(":")
        out[parts[1]] = parts[0]
    return out


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def stack_config_path(compose: dict[str, Any]) -> Path:
    """The repository file behind the sweep config the rpsft service runs (through its bind mounts)."""
    svc = service(compose, "rpsft")
    target = as_list(svc["command"])[3]  # rpsft sweep run CONFIG
    for container, source in volume_mounts(svc).items():
        if under(target, container) and source.startswith("."):
            return (REPO / source / os.path.relpath(target, container)).resolve()
    raise AssertionError(f"the rpsft service's sweep config {target} is on no bind mount of the repository")


def db_name(url: str) -> str:
    return urlparse(url).path.lstrip("/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- compose file


def test_compose_services_and_dependencies(compose):
    assert set(SERVICES) <= set(compose["services"])
    for name, svc in compose["services"].items():
        deps = svc.get("depends_on") or {}
        for dep in deps:
            assert dep in compose["services"], f"{name} depends on unknown service {dep}"
            if isinstance(deps, dict):
                assert deps[dep]["condition"] in ("service_started", "service_healthy")
                if deps[dep]["condition"] == "service_healthy":
                    assert "healthcheck" in compose["services"][dep], f"{dep} has no healthcheck"
        assert "image" in svc or "build" in svc, name
    assert set(service(compose, "rpsft")["depends_on"]) >= {"postgres", "mlflow", "ray-head"}
    assert "postgres" in service(compose, "mlflow")["depends_on"]


def test_compose_variables_are_documented_with_the_same_defaults(raw_compose):
    documented = env_example()
    used = {}
    for m in VAR.finditer(COMPOSE_FILE.read_text()):
        used.setdefault(m.group(1), set()).add(m.group(2))
    assert used, "docker-compose.yml uses no variables"
    for name, defaults in used.items():
        assert name in documented, f"${{{name}}} is not documented in deploy/.env.example"
        assert defaults == {documented[name]}, f"{name}: compose defaults {defaults} vs .env.example"
    secrets_ = (
        "POSTGRES_PASSWORD",
        "MLFLOW_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "RAY_AUTH_TOKEN",
    )
    assert set(secrets_) <= set(used)
    assert len(documented["MLFLOW_ADMIN_PASSWORD"]) >= 12  # MLflow refuses a shorter admin password


def test_volumes_are_declared_and_bind_mounts_exist(compose):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in compose["services"].items():
        for container, source in volume_mounts(svc).items():
            assert container.startswith("/"), f"{name}: {container}"
            if source.startswith((".", "/")):
                if "paper-data" not in source:  # the evaluation items live outside the repository
                    assert (REPO / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared under volumes:"
                used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_postgres_creates_separate_databases_for_mlflow_auth_and_optuna(compose):
    pg = service(compose, "postgres")
    # a pinned major version: a new major release changes the data directory format of the named volume
    assert re.fullmatch(r"postgres:\d+(\.\d+)?(-[a-z0-9]+)?", pg["image"]), pg["image"]
    mounts = volume_mounts(pg)
    assert mounts["/var/lib/postgresql/data"] in compose["volumes"]  # a named volume
    assert pg["healthcheck"]["test"]
    init = [s for c, s in mounts.items() if c.startswith("/docker-entrypoint-initdb.d/")]
    assert init, "no init script in /docker-entrypoint-initdb.d"
    sql = "\n".join((REPO / s).read_text() for s in init)
    created = set(re.findall(r"CREATE\s+DATABASE\s+(\w+)", sql, re.I))

    mlflow_db = db_name(option(as_list(service(compose, "mlflow")["command"]), "--backend-store-uri"))
    auth = configparser.ConfigParser()
    auth.read(REPO / "deploy" / "mlflow" / "basic_auth.ini")
    auth_db = db_name(auth["mlflow"]["database_uri"])
    from rpsft.sweeps.config.sweep import load_sweep_config

    optuna_db = db_name(load_sweep_config(stack_config_path(compose)).storage.optuna)
    assert {mlflow_db, auth_db, optuna_db} <= created
    assert len({mlflow_db, auth_db, optuna_db}) == 3  # MLflow and Optuna both keep alembic_version
    backend = urlparse(option(as_list(service(compose, "mlflow")["command"]), "--backend-store-uri"))
    assert backend.username == env_of(pg)["POSTGRES_USER"] and backend.hostname == "postgres"
    assert urlparse(auth["mlflow"]["database_uri"]).username == env_of(pg)["POSTGRES_USER"]


def test_mlflow_server_uses_postgres_basic_auth_and_served_artifacts(compose):
    svc = service(compose, "mlflow")
    cmd = as_list(svc["command"])
    assert cmd[:2] == ["mlflow", "server"]
    assert option(cmd, "--app-name") == "basic-auth"
    assert option(cmd, "--backend-store-uri").startswith("postgresql")
    assert "--serve-artifacts" in cmd and "--no-serve-artifacts" not in cmd
    artifacts = option(cmd, "--artifacts-destination")
    assert volume_mounts(svc)[artifacts] in compose["volumes"]  # artifacts on a named volume
    assert option(cmd, "--host") == "0.0.0.0"
    port = option(cmd, "--port")
    assert any(str(p).endswith(f":{port}") for p in svc["ports"])

    env = env_of(svc)
    ini = volume_mounts(svc)[env["MLFLOW_AUTH_CONFIG_PATH"]]
    assert (REPO / ini).is_file()
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert len(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) >= 12

    # the tracking URI the driver uses passes the server's Host-header check
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = [h.strip() for h in option(cmd, "--allowed-hosts").split(",")]
    tracking = urlparse(env_of(service(compose, "rpsft"))["MLFLOW_TRACKING_URI"])
    assert tracking.hostname == "mlflow" and str(tracking.port) == port
    assert is_allowed_host_header(allowed, tracking.netloc)
    assert is_allowed_host_header(allowed, f"localhost:{port}")


@pytest.mark.integration
def test_auth_ini_is_read_by_mlflow_with_a_postgres_store(compose, monkeypatch):
    from mlflow.server.auth.config import DEFAULT_AUTHORIZATION_FUNCTION, read_auth_config

    env = env_of(service(compose, "mlflow"))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(REPO / "deploy" / "mlflow" / "basic_auth.ini"))
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.setenv(name, env[name])
    config = read_auth_config()
    assert config.database_uri.startswith("postgresql")
    assert urlparse(config.database_uri).hostname == "postgres"
    assert config.default_permission in ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
    assert config.authorization_function == DEFAULT_AUTHORIZATION_FUNCTION
    assert (config.admin_username, config.admin_password) == (
        env["MLFLOW_AUTH_ADMIN_USERNAME"],
        env["MLFLOW_AUTH_ADMIN_PASSWORD"],
    )
    # the sweep logs in as that admin
    rpsft = env_of(service(compose, "rpsft"))
    assert rpsft["MLFLOW_TRACKING_USERNAME"] == config.admin_username
    assert rpsft["MLFLOW_TRACKING_PASSWORD"] == config.admin_password


def test_ray_head_and_gpu_worker(compose):
    head = as_list(service(compose, "ray-head")["command"])
    assert head[:2] == ["ray", "start"] and "--head" in head and "--block" in head
    gcs_port = option(head, "--port")
    for port in (gcs_port, option(head, "--ray-client-server-port"), option(head, "--dashboard-port")):
        assert any(str(p).endswith(f":{port}") for p in service(compose, "ray-head")["ports"]), port
    assert len({gcs_port, option(head, "--ray-client-server-port"), option(head, "--dashboard-port")}) == 3
    assert option(head, "--dashboard-host") == "0.0.0.0"
    assert service(compose, "ray-head")["healthcheck"]["test"]

    worker_svc = service(compose, "ray-worker")
    worker = as_list(worker_svc["command"])
    assert worker[:2] == ["ray", "start"] and "--head" not in worker and "--block" in worker
    assert option(worker, "--address") == f"ray-head:{gcs_port}"
    assert "ray-head" in worker_svc["depends_on"]
    devices = worker_svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_ray_nodes_and_driver_share_image_token_and_paths(compose):
    svcs = {name: service(compose, name) for name in RAY_SERVICES}
    assert len({s["image"] for s in svcs.values()}) == 1  # one Ray and Python version on every node
    assert service(compose, "mlflow")["image"] == svcs["rpsft"]["image"]  # the same MLflow as the client
    envs = {name: env_of(s) for name, s in svcs.items()}
    assert {e["RAY_AUTH_MODE"] for e in envs.values()} == {"token"}
    assert len({e["RAY_AUTH_TOKEN"] for e in envs.values()}) == 1
    mounts = {name: volume_mounts(s) for name, s in svcs.items()}
    shared = set.intersection(*(set(m.items()) for m in mounts.values()))
    assert {"/runs", "/cache", "/data/paper-data"} <= {c for c, _ in shared}
    assert len({e["RPSFT_CACHE_DIR"] for e in envs.values()}) == 1
    assert any(under(envs["rpsft"]["RPSFT_CACHE_DIR"], c) for c, _ in shared)
    for s in svcs.values():
        assert str(s.get("shm_size", "")).endswith(("gb", "g")), "Ray's object store needs /dev/shm"


def test_rpsft_service_runs_the_stack_sweep_on_the_cluster(compose):
    from rpsft.sweeps.config.sweep import load_sweep_config

    svc = service(compose, "rpsft")
    cmd = as_list(svc["command"])
    head_port = option(as_list(service(compose, "ray-head")["command"]), "--port")
    assert cmd[:3] == ["rpsft", "sweep", "run"] and option(cmd, "--address") == f"ray-head:{head_port}"
    env = env_of(svc)
    assert env["RAY_JOIN_ADDRESS"] == f"ray-head:{head_port}"
    entrypoint = as_list(svc["entrypoint"])
    assert entrypoint == ["/app/deploy/ray-join.sh"]

    config = load_sweep_config(stack_config_path(compose))
    assert config.storage.mlflow == env["MLFLOW_TRACKING_URI"]
    assert config.storage.ray_address == f"ray-head:{head_port}"
    optuna = urlparse(config.storage.optuna)
    assert optuna.scheme.startswith("postgresql") and optuna.hostname == "postgres"
    assert optuna.username == env_of(service(compose, "postgres"))["POSTGRES_USER"]
    assert env["PGPASSWORD"] == env_of(service(compose, "postgres"))["POSTGRES_PASSWORD"]
    # state and evaluation items on paths every Ray node mounts
    shared = set.intersection(*(set(volume_mounts(service(compose, n))) for n in RAY_SERVICES))
    assert any(under(config.output_dir, c) for c in shared), config.output_dir
    assert any(under(config.evaluation.data_dir, c) for c in shared), config.evaluation.data_dir
    assert config.concurrency * config.resources.gpus <= 1 or config.resources.gpus == 0


def _read_by(name: str) -> str | None:
    """Who reads environment variable ``name``: mlflow, libpq, Ray, or this project's code."""
    import mlflow.environment_variables as mlflow_env

    var = getattr(mlflow_env, name, None)
    if var is not None and getattr(var, "name", None) == name:
        return "mlflow"
    if name in LIBPQ_ENV:
        return "libpq"
    if name.startswith("RAY_"):
        import ray

        raylet = Path(ray.__file__).parent / "_raylet.so"
        if raylet.is_file() and name.encode() in raylet.read_bytes():
            return "ray"
    if name == "TOKENIZERS_PARALLELISM":
        return "tokenizers"
    sources = [
        p for d in ("rpsft_core", "sweeps", "evaluation", "dashboards") for p in (REPO / d).rglob("*.py")
    ]
    sources += list((REPO / "deploy").glob("*.sh"))
    for path in sources:
        if re.search(rf"\b{name}\b", path.read_text()):
            return str(path.relative_to(REPO))
    return None


def test_service_env_vars_are_read_by_the_code(compose):
    for name in ("mlflow", *RAY_SERVICES):
        for var in env_of(service(compose, name)):
            assert _read_by(var), f"{name}: environment variable {var} is read by nothing"
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert var in env_of(service(compose, "rpsft"))


def test_driver_forwards_mlflow_credentials_to_trials(compose, monkeypatch):
    """The trials run in Ray workers: the driver hands them the rpsft service's MLflow credentials."""
    import ray
    from rpsft.sweeps.ray_session import init_ray

    env = env_of(service(compose, "rpsft"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    init_ray("ray-head:6379")
    assert seen["address"] == "ray-head:6379"
    forwarded = seen["runtime_env"]["env_vars"]
    for var in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "RPSFT_CACHE_DIR",
    ):
        assert forwarded[var] == env[var]
    assert "PGPASSWORD" not in forwarded  # only the driver talks to Optuna's database


def test_join_script_joins_as_an_empty_node_then_runs_the_command(compose, tmp_path):
    """Run with a stand-in ``ray`` on PATH: with RAY_JOIN_ADDRESS it joins that address with no CPU or GPU,
    then execs the given command; without it, it only runs the command."""
    script = REPO / "deploy" / "ray-join.sh"
    assert os.access(script, os.X_OK)
    log = tmp_path / "ray.args"
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    address = env_of(service(compose, "rpsft"))["RAY_JOIN_ADDRESS"]
    joined = subprocess.run(
        [str(script), "echo", "command ran"],
        env={**env, "RAY_JOIN_ADDRESS": address},
        capture_output=True,
        text=True,
    )
    assert joined.returncode == 0 and joined.stdout.strip() == "command ran", joined.stderr
    args = log.read_text().split()
    assert args[:3] == ["start", "--address", address]
    assert (
        option(args, "--num-cpus") == "0" and option(args, "--num-gpus") == "0"
    )  # the driver's node takes no trial
    log.unlink()
    env.pop("RAY_JOIN_ADDRESS", None)
    alone = subprocess.run([str(script), "echo", "command ran"], env=env, capture_output=True, text=True)
    assert alone.returncode == 0 and alone.stdout.strip() == "command ran" and not log.exists()


# ----------------------------------------------------------------------------------------------- image


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pip_installs(commands: str) -> list[list[str]]:
    """The arguments of each ``pip install`` in a shell text (quotes and ``${VAR:-default}`` resolved)."""
    import shlex

    installs = []
    for command in re.split(r"&&|;|\n|\bthen\b|\belse\b", commands):
        if "pip install" not in command:
            continue
        words = shlex.split(VAR.sub(lambda m: m.group(2) or "", command), comments=True)
        if words[:2] == ["pip", "install"]:
            installs.append([w for w in words[2:] if w == "--no-deps" or not w.startswith(("-", "$"))])
    return installs


def test_dockerfile_installs_what_the_setup_script_and_the_stack_need(compose):
    """The image installs the project with every extra, the same torch and --no-deps wheels as
    scripts/setup.sh, and the extras the compose services use (basic auth, Ray's dashboard and client)."""
    import tomllib
    from packaging.specifiers import SpecifierSet

    instructions = dockerfile_instructions()
    base = instructions[0]
    assert base[0] == "FROM" and (m := re.fullmatch(r"python:(\d+\.\d+)(-[a-z0-9]+)?", base[1])), base
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert m.group(1) in SpecifierSet(project["requires-python"])

    args = {a.split("=")[0]: a.partition("=")[2] for w, a in instructions if w == "ARG"}
    runs = "\n".join(rest for word, rest in instructions if word == "RUN").replace(
        "${TORCH_VERSION}", args["TORCH_VERSION"]
    )
    image = pip_installs(runs)
    setup = pip_installs((REPO / "scripts" / "setup.sh").read_text())
    assert image and setup
    flat = {w for words in image for w in words}
    extras = set(project["optional-dependencies"])
    for words in setup:  # the same torch and the same wheels without their dependencies as a local setup
        if words[0] == "--no-deps" or words[0].startswith("torch=="):
            assert words in image, f"scripts/setup.sh installs {words}, the image does not"
    local = next(w for w in flat if w.startswith(".["))
    assert set(local[2:-1].split(",")) <= extras and "all" in local
    assert set(
        project["optional-dependencies"]["all"][0].partition("[")[2].rstrip("]").split(",")
    ) == extras - {
        "all",
        "dev",
    }
    mlflow_cmd = as_list(service(compose, "mlflow")["command"])
    if option(mlflow_cmd, "--app-name") == "basic-auth":
        assert "mlflow[auth]" in flat
    head = as_list(service(compose, "ray-head")["command"])
    ray_extras = {e for w in flat if w.startswith("ray[") for e in w[4:-1].split(",")}
    if option(head, "--dashboard-port"):
        assert "default" in ray_extras
    if option(head, "--ray-client-server-port"):
        assert "client" in ray_extras
    workdir = [rest for word, rest in instructions if word == "WORKDIR"][-1]
    copies = [rest.split() for word, rest in instructions if word == "COPY"]
    assert [".", workdir] in copies or [".", workdir + "/"] in copies
    # the pip install runs after the sources are copied
    copy_at = max(i for i, (w, rest) in enumerate(instructions) if w == "COPY" and rest.startswith(". "))
    assert any(w == "RUN" and ".[all]" in rest for w, rest in instructions[copy_at:])


def test_dockerignore_keeps_the_build_inputs(compose):
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch(p, pat.removeprefix("**/")) or fnmatch(p, pat) for p in prefixes for pat in patterns
        )

    needed = ["pyproject.toml", "README.md", "deploy/ray-join.sh"]
    needed += [f"{pkg}/__init__.py" for pkg in ("rpsft_core", "sweeps", "evaluation", "dashboards")]
    for path in needed:
        assert (REPO / path).exists() and not ignored(path), path
    for path in (".venv/bin/python", ".git/HEAD", "runs/sweeps/x.db", ".env"):
        assert ignored(path), path
    # the rpsft service's entrypoint is that file, copied to the image's WORKDIR
    workdir = [rest for word, rest in dockerfile_instructions() if word == "WORKDIR"][-1]
    assert service(compose, "rpsft")["entrypoint"][0] == f"{workdir}/deploy/ray-join.sh"


# ----------------------------------------------------------------------------------------------- compose CLI


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.skipif(
    compose_cli() is None, reason="neither `docker compose` nor `docker-compose` is installed"
)
@pytest.mark.parametrize("env_file", [None, ENV_EXAMPLE])
@pytest.mark.integration
def test_compose_cli_validates_the_file(tmp_path, env_file):
    cli = compose_cli()
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path))}
    cmd = [*cli, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE)]
    if env_file is not None:
        cmd += ["--env-file", str(env_file)]
    proc = subprocess.run([*cmd, "config"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rendered = yaml.safe_load(proc.stdout)
    assert set(SERVICES) <= set(rendered["services"])
    devices = rendered["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    mlflow_cmd = as_list(rendered["services"]["mlflow"]["command"])
    assert option(mlflow_cmd, "--app-name") == "basic-auth"
    expected = env_example()["MLFLOW_ADMIN_PASSWORD"]
    assert rendered["services"]["rpsft"]["environment"]["MLFLOW_TRACKING_PASSWORD"] == expected


# ----------------------------------------------------------------------------------------------- natively

CLUSTER_STATE = r"""
import json, sys
import ray
from ray._private import state

ray.init(address=sys.argv[1], include_dashboard=False, configure_logging=False, log_to_driver=False)
jobs = [{"id": j["JobID"], "pid": j["DriverPid"]} for j in state.jobs()]
actors = [{"cls": a["ActorClassName"], "job": a["JobID"]} for a in state.actors().values()]
print("STATE " + json.dumps({"jobs": jobs, "actors": actors}))
"""


@dataclasses.dataclass
class NativeStack:
    mlflow_url: str
    ray_address: str
    username: str
    password: str
    env: dict[str, str]  # what a driver needs: the Ray token, the MLflow credentials
    artifacts: Path


def session_processes(sid: int) -> list[int]:
    import psutil

    out = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.pid != os.getpid():
                out.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return out


def stop(proc: subprocess.Popen, leader_first: bool = False, wait: float = 30) -> None:
    """Stop a service started in its own session: SIGTERM (to its leader, or its process group), then SIGKILL
    whatever is left in that session (e.g. Ray's workers, which sit in process groups of their own)."""
    try:
        if proc.poll() is None:
            if leader_first:
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(wait)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for pid in session_processes(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def wait_until(check, timeout: float, what: str, procs: list[tuple[subprocess.Popen, Path]]) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc, log in procs:
            if proc.poll() is not None:
                pytest.fail(f"{what}: exited with {proc.returncode}\n{log.read_text()[-3000:]}")
        if check():
            return
        time.sleep(0.5)
    pytest.fail(
        f"{what}: not ready after {timeout:.0f}s\n" + "\n".join(log.read_text()[-2000:] for _, log in procs)
    )


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def psycopg_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture
def native_stack(tmp_path, compose) -> Iterator[NativeStack]:
    """The compose stack's MLflow server and Ray head, started natively from the services' commands: the
    tracking and auth stores on fresh PostgreSQL schemas, the shipped auth ini, a Ray head with token auth."""
    pytest.importorskip(
        "flask_wtf", reason="the MLflow basic-auth app needs Flask-WTF (pip install 'mlflow[auth]')"
    )
    schemas: list[str] = []
    procs: list[tuple[subprocess.Popen, bool]] = []
    # a short temp dir: Ray's socket paths have a length limit; its own, so no other Ray finds this cluster
    ray_temp = Path(tempfile.mkdtemp(prefix="rstk", dir="/tmp"))
    try:
        tracking_schema, tracking_url = pg_schema()
        auth_schema, auth_url = pg_schema()
        schemas += [tracking_schema, auth_schema]

        # MLflow: the compose service's command and auth ini, on this machine's PostgreSQL
        mlflow_svc = service(compose, "mlflow")
        mlflow_env = env_of(mlflow_svc)
        ini = configparser.RawConfigParser()
        ini.read(REPO / volume_mounts(mlflow_svc)[mlflow_env["MLFLOW_AUTH_CONFIG_PATH"]])
        ini["mlflow"]["database_uri"] = psycopg_url(auth_url).replace("%", "%%")
        ini_path = tmp_path / "basic_auth.ini"
        with ini_path.open("w") as f:
            ini.write(f)
        password = secrets.token_urlsafe(16)
        port = free_port()
        artifacts = tmp_path / "mlartifacts"
        cmd = as_list(mlflow_svc["command"])
        cmd = [
            str(BIN / "mlflow"),
            *with_options(
                cmd[1:],
                {
                    "--backend-store-uri": psycopg_url(tracking_url),
                    "--artifacts-destination": str(artifacts),
                    "--host": "127.0.0.1",
                    "--port": str(port),
                    "--workers": "1",
                },
            ),
        ]
        env = {
            **os.environ,
            **mlflow_env,
            "MLFLOW_AUTH_CONFIG_PATH": str(ini_path),
            "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        }
        env.pop("PGPASSWORD")  # local PostgreSQL: trust auth
        mlflow_log = tmp_path / "mlflow.log"
        server = subprocess.Popen(
            cmd, stdout=mlflow_log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        procs.append((server, False))

        # Ray: the head's command, on free ports, without the dashboard and the client server
        head_env = env_of(service(compose, "ray-head"))
        ray_env = {
            "RAY_AUTH_MODE": head_env["RAY_AUTH_MODE"],
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
        }
        gcs_port = free_port()
        cmd = as_list(service(compose, "ray-head")["command"])
        cmd = [
            str(BIN / "ray"),
            *with_options(
                cmd[1:],
                {
                    "--port": str(gcs_port),
                    "--ray-client-server-port": None,  # needs ray[client]
                    "--dashboard-host": None,
                    "--dashboard-port": None,
                    "--include-dashboard": "false",
                    "--num-cpus": "2",
                    "--temp-dir": str(ray_temp),
                    "--dashboard-agent-listen-port": str(free_port()),
                    "--metrics-export-port": str(free_port()),
                },
            ),
        ]
        env = {**os.environ, **ray_env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        env.pop("RAY_ADDRESS", None)
        ray_log = tmp_path / "ray-head.log"
        head = subprocess.Popen(
            cmd, stdout=ray_log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        procs.append((head, True))

        url = f"http://127.0.0.1:{port}"
        address_file = ray_temp / "ray_current_cluster"
        wait_until(address_file.exists, 180, "ray start --head", [(head, ray_log)])
        wait_until(lambda: http_status(url + "/health") == 200, 240, "mlflow server", [(server, mlflow_log)])
        yield NativeStack(
            mlflow_url=url,
            ray_address=f"127.0.0.1:{gcs_port}",
            username=mlflow_env["MLFLOW_AUTH_ADMIN_USERNAME"],
            password=password,
            env={
                **ray_env,
                "MLFLOW_TRACKING_USERNAME": mlflow_env["MLFLOW_AUTH_ADMIN_USERNAME"],
                "MLFLOW_TRACKING_PASSWORD": password,
            },
            artifacts=artifacts,
        )
    finally:
        for proc, leader_first in reversed(procs):
            stop(proc, leader_first=leader_first, wait=60 if leader_first else 10)
        shutil.rmtree(ray_temp, ignore_errors=True)
        for schema in schemas:
            drop_pg_schema(schema)


@pytest.mark.skipif(not PAPER_DATA.is_dir(), reason="shared/paper-data is not present")
@pytest.mark.skipif(not pg_available(), reason="no PostgreSQL on 127.0.0.1:5432")
@pytest.mark.slow
@pytest.mark.integration
def test_sweep_on_the_native_stack(tmp_path, smol_tokenizer, native_stack, monkeypatch):
    stack = native_stack
    api = stack.mlflow_url + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(api) == 401  # basic auth is on
    assert http_status(api, (stack.username, "not-the-password")) == 401
    assert http_status(api, (stack.username, stack.password)) == 200

    optuna_schema, optuna_url = pg_schema()
    try:
        model_dir = tiny_model_dir(tmp_path, smol_tokenizer)
        raw = sweep_dict(
            "stack",
            model_dir,
            tmp_path,
            references=["sft"],
            search={"num_trials": 1, "seed": 0},
            concurrency=2,
            storage={
                "optuna": psycopg_url(optuna_url),
                "mlflow": stack.mlflow_url,
                "experiment": "rpsft-stack",
            },
        )
        config_path = tmp_path / "stack.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        env = {**os.environ, **stack.env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        env.pop("RAY_ADDRESS", None)
        driver = subprocess.Popen(
            [sys.executable, "-m", "rpsft", "sweep", "run", str(config_path), "--address", stack.ray_address],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = driver.communicate(timeout=540)
        except subprocess.TimeoutExpired:
            stop(driver)
            pytest.fail("rpsft sweep did not finish in 540 s")
        assert driver.returncode == 0, out[-4000:]
        assert "operating point" in out

        # the runs, read with the stack's credentials
        for key, value in stack.env.items():
            if key.startswith("MLFLOW_"):
                monkeypatch.setenv(key, value)
        from rpsft.sweeps.store import tracking

        client = tracking.client_for(stack.mlflow_url)
        experiment = client.get_experiment_by_name("rpsft-stack")
        assert experiment is not None
        parents = client.search_runs([experiment.experiment_id], "tags.`rpsft.role` = 'sweep'")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        runs = tracking.child_runs(client, experiment.experiment_id, parents[0].info.run_id)
        assert len(runs) == 2  # the sft reference and a searched trial, run side by side
        for run in runs:
            assert run.info.status == "FINISHED", run.data.tags
            assert {"g_id", "f_ood"} <= set(run.data.metrics)
            assert "result.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
        # artifacts went through the server into its --artifacts-destination
        assert len(list(stack.artifacts.rglob("result.json"))) == len(runs)

        import optuna

        study = optuna.load_study(study_name="stack", storage=psycopg_url(optuna_url))
        assert [t.state.name for t in study.trials] == ["COMPLETE"]

        # the trials ran on the cluster started above: its job table holds the rpsft driver, and one Tune
        # trial actor per trial ran in that job
        probe = subprocess.run(
            [sys.executable, "-c", CLUSTER_STATE, stack.ray_address],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        line = next((ln for ln in probe.stdout.splitlines() if ln.startswith("STATE ")), None)
        assert line, probe.stdout[-2000:] + probe.stderr[-2000:]
        cluster = json.loads(line.removeprefix("STATE "))
        jobs = [j["id"] for j in cluster["jobs"] if j["pid"] == driver.pid]
        assert len(jobs) == 1, cluster["jobs"]
        trial_actors = [a for a in cluster["actors"] if a["job"] == jobs[0] and a["cls"] == "ImplicitFunc"]
        assert len(trial_actors) == len(runs), cluster["actors"]
    finally:
        drop_pg_schema(optuna_schema)
