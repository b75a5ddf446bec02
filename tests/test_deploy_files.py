"""Issue 9 (scale-out): the deployment files are valid even though Docker
cannot run here. ``docker-compose.yml`` is parsed and checked service by
service against what the nodes need (shared index and bucket, distinct node
ids, health checks, start order); ``deploy/nginx.conf`` goes through the real
``nginx -t`` with the node names pointed at loopback, and its upstreams are
checked against the compose services and the ports the image exposes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from pacs.settings import Settings

from .peers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
DEPLOY_README = ROOT / "deploy" / "README.md"
NODES = ("pacs-a", "pacs-b")
# HTTP, DICOM, HL7/MLLP: what the image exposes and the balancer publishes.
PORTS = {"http": 8042, "dicom": 11112, "hl7": 2575}

# Compose specification keys this file may use (a typo would be ignored by a
# YAML parser but refused by Docker).
TOP_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets"}
SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "env_file", "ports", "expose", "volumes",
    "depends_on", "healthcheck", "restart", "hostname", "stop_grace_period", "networks", "user",
    "working_dir", "labels", "logging", "deploy", "ulimits", "pull_policy",
}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# PACS_* variables read outside the Settings model.
EXTRA_PACS_ENV = {"PACS_CONFIG", "PACS_LEASE_TTL"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the "KEY=value" list form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _expanded(value: str) -> str:
    """*value* with ``${VAR...}`` replaced by a plain word, so URLs parse."""
    return re.sub(r"\$\{[^}]*\}", "VALUE", value)


def test_compose_structure(compose: dict[str, Any]) -> None:
    assert {k for k in compose if not k.startswith("x-")} <= TOP_KEYS
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "nginx", *NODES} <= set(services)
    named_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert set(service) <= SERVICE_KEYS, f"{name}: unknown keys {set(service) - SERVICE_KEYS}"
        assert "image" in service or "build" in service, name
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert spec["condition"] in CONDITIONS, (name, dep)
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy: it has no healthcheck"
        if "healthcheck" in service:
            check = service["healthcheck"]
            assert set(check) <= HEALTHCHECK_KEYS, name
            assert isinstance(check["test"], list) and check["test"][0] in ("CMD", "CMD-SHELL"), name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named_volumes, f"{name} uses undeclared volume {source}"
    # No cycle in the start order.
    seen: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join((*path, name))}"
        if name in seen:
            return
        for dep in services[name].get("depends_on") or {}:
            visit(dep, (*path, name))
        seen.add(name)

    for name in services:
        visit(name, ())


def test_pacs_nodes_share_index_and_bucket(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nodes = [services[n] for n in NODES]
    envs = [_env(n) for n in nodes]
    # One image, from the repository's Dockerfile.
    assert {n["image"] for n in nodes} == {nodes[0]["image"]}
    for node in nodes:
        build = node["build"]
        context = ROOT / (build["context"] if isinstance(build, dict) else build)
        assert (context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")).is_file()
    dockerfile = (ROOT / "Dockerfile").read_text()
    exposed = {int(p) for line in dockerfile.splitlines() if line.startswith("EXPOSE") for p in line.split()[1:]}
    assert exposed == set(PORTS.values())
    # Everything but the node id is the same on every node.
    required = {"PACS_INDEX_URL", "PACS_STORAGE_URL", "PACS_S3_ACCESS_KEY", "PACS_S3_SECRET_KEY", "PACS_HOST",
                "PACS_NODE_ID", "PACS_DEIDENTIFY_SALT"}
    for env in envs:
        assert required <= set(env), required - set(env)
        assert env["PACS_HOST"] == "0.0.0.0"
        unknown = {k for k in env if k.startswith("PACS_") and k not in EXTRA_PACS_ENV
                   and k[5:].lower() not in Settings.model_fields}
        assert not unknown, f"not a setting: {unknown}"
    assert len({env["PACS_NODE_ID"] for env in envs}) == len(NODES)
    shared = [{k: v for k, v in env.items() if k != "PACS_NODE_ID"} for env in envs]
    assert all(s == shared[0] for s in shared)
    env = envs[0]
    # The index is the postgres service's database, with its user and password.
    pg = _env(services["postgres"])
    index = urlsplit(_expanded(env["PACS_INDEX_URL"]))
    assert index.scheme.startswith("postgresql")
    assert index.hostname == "postgres" and (index.port or 5432) == 5432
    assert index.path == "/" + pg["POSTGRES_DB"] and index.username == pg["POSTGRES_USER"]
    assert "${POSTGRES_PASSWORD" in env["PACS_INDEX_URL"] and "${POSTGRES_PASSWORD" in pg["POSTGRES_PASSWORD"]
    assert "locale=C" in pg.get("POSTGRES_INITDB_ARGS", ""), "the index expects a C collation"
    # The bucket is on the minio service and minio-init creates it, with the nodes' key.
    storage = urlsplit(env["PACS_STORAGE_URL"])
    assert storage.scheme == "s3"
    endpoint = parse_qs(storage.query)["endpoint"][0]
    assert endpoint == "minio:9000"
    init = services["minio-init"]
    script = " ".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    assert f"mc mb --ignore-existing local/{storage.netloc}" in script
    init_env = _env(init)
    for key in ("PACS_S3_ACCESS_KEY", "PACS_S3_SECRET_KEY"):
        assert init_env[key] == env[key], key
        assert f"$${key}" in script  # expanded inside the container, not by Compose
    # Start order: the index and the bucket first; the second node after the first.
    for node in nodes:
        assert node["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert node["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        assert node["healthcheck"]["test"][:3] == ["CMD", "pacs", "health"]
    assert services["pacs-b"]["depends_on"]["pacs-a"]["condition"] == "service_healthy"


def test_secrets_come_from_env_and_are_documented(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert {"POSTGRES_PASSWORD", "PACS_S3_SECRET_KEY", "PACS_DEIDENTIFY_SALT", "MINIO_ROOT_PASSWORD"} <= required
    readme = DEPLOY_README.read_text()
    for name in required:
        assert f"{name}=" in readme, f"deploy/README.md does not show how to set {name}"
    # No literal secret slipped in.
    for service in compose["services"].values():
        for key, value in _env(service).items():
            if any(word in key for word in ("PASSWORD", "SECRET", "SALT")):
                assert value.startswith(("${", "postgresql://")), key


def test_nginx_balances_every_port_over_every_node(compose: dict[str, Any]) -> None:
    nginx = compose["services"]["nginx"]
    # "HOST:CONTAINER" (or "IP:HOST:CONTAINER"): the same port outside and in.
    mappings = [str(p).split(":")[-2:] for p in nginx["ports"]]
    assert all(len(m) == 2 and m[0] == m[1] for m in mappings), mappings
    assert {int(m[1]) for m in mappings} == set(PORTS.values())
    assert any(v.startswith("./deploy/nginx.conf:/etc/nginx/nginx.conf") for v in nginx["volumes"])
    conf = NGINX_CONF.read_text()
    upstreams = dict(re.findall(r"upstream\s+(\w+)\s*\{([^}]*)\}", conf))
    servers = {name: set(re.findall(r"server\s+([\w.-]+):(\d+)", body)) for name, body in upstreams.items()}
    # Each "listen N;" is routed by the first proxy_pass that follows it.
    routed: dict[int, str] = {}
    for match in re.finditer(r"listen\s+(\d+)\s*;", conf):
        target = re.search(r"proxy_pass\s+(?:http://)?(\w+)\s*;", conf[match.end():])
        assert target is not None, f"listen {match.group(1)} proxies nowhere"
        routed[int(match.group(1))] = target.group(1)
    assert set(routed) == set(PORTS.values()), routed
    for port, upstream in routed.items():
        assert servers[upstream] == {(node, str(port)) for node in NODES}, (port, servers[upstream])
    # The HTTP side is proxied as HTTP (headers, large bodies); DICOM and MLLP as TCP streams.
    http_block = conf[conf.index("http {"):conf.index("stream {")]
    stream_block = conf[conf.index("stream {"):]
    assert "proxy_pass http://" + routed[PORTS["http"]] in http_block
    assert "client_max_body_size 0" in http_block
    for kind in ("dicom", "hl7"):
        assert f"listen {PORTS[kind]}" in stream_block


def _nginx() -> str:
    path = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(path).exists():
        pytest.fail("nginx missing: apt-get install -y nginx libnginx-mod-stream (bash scripts/test.sh does it)")
    return path


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = _nginx()
    text = NGINX_CONF.read_text()
    # Docker's DNS resolves the node names; here they point at loopback.
    for node in NODES:
        text = text.replace(f"{node}:", "127.0.0.1:")
    built = subprocess.run([nginx, "-V"], capture_output=True, text=True, check=False).stderr
    if "--with-stream=dynamic" in built:
        # Debian builds the stream module as a module; the official image has it built in.
        module = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
        if not module.exists():
            pytest.fail("nginx stream module missing: apt-get install -y libnginx-mod-stream")
        text = f"load_module {module};\n{text}"
    elif "--with-stream" not in built:
        pytest.fail("this nginx has no stream module (TCP balancing for DICOM and MLLP)")
    # Temp files under the test's folder, so nginx -t also works without root.
    temp = "".join(f"    {kind}_temp_path {tmp_path}/{kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = text.replace("http {\n", "http {\n" + temp, 1)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    result = subprocess.run(
        [nginx, "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(conf), "-g", f"pid {tmp_path}/nginx.pid;"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr


def test_the_systemd_unit_is_valid_and_runs_the_documented_command(tmp_path: Path) -> None:
    """One server as a service (scripts/install-service.sh): the unit it
    installs passes ``systemd-analyze verify``, starts the clone's own
    ``pacs serve`` on the data dir given, restarts it, and reads the settings file."""
    printed = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-service.sh"), "--print", str(tmp_path / "pacs data/../data")],
        capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin", "PACS_ENV_FILE": "/etc/x.env"},
    ).stdout
    assert "@" not in printed.replace("multi-user.target", "")
    unit = tmp_path / "filmless-pacs.service"
    unit.write_text(printed)
    verify = subprocess.run(["systemd-analyze", "verify", unit.name], cwd=tmp_path, capture_output=True, text=True)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    service = dict(
        line.split("=", 1) for line in printed.splitlines() if "=" in line and not line.startswith("#")
    )
    assert service["ExecStart"] == f"{ROOT}/.venv/bin/pacs serve --data-dir {tmp_path}/data"
    assert service["EnvironmentFile"] == "-/etc/x.env" and service["Restart"] == "always"
    assert service["ReadWritePaths"] == f"{tmp_path}/data"
    usage = subprocess.run([*service["ExecStart"].split()[:2], "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--data-dir" in usage.stdout


def _dockerfile_env() -> dict[str, str]:
    """The Dockerfile's ENV settings (``ENV A=1 \\`` continued lines included)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in line[4:].split())
    return env


def test_image_listening_on_the_network_takes_only_registered_aes() -> None:
    """The image listens on every interface: without the allowlist any
    machine could query and retrieve every patient under any AE title."""
    env = _dockerfile_env()
    assert env["PACS_HOST"] == "0.0.0.0"
    assert env.get("PACS_AE_ALLOWLIST") == "true"
    assert {k[5:].lower() for k in env if k.startswith("PACS_")} <= set(Settings.model_fields)
    # How an operator registers the modalities is said where the image is built.
    assert "pacs ae add" in (ROOT / "Dockerfile").read_text()


def test_the_image_can_back_up_the_compose_database(compose: dict[str, Any]) -> None:
    """`docker compose exec pacs-a pacs backup --out /data/index.bak`, the
    README's step before an upgrade, failed: the image had no pg_dump
    ("install postgresql-client"), and the base image's Debian client (15)
    refuses the compose file's PostgreSQL 16 server (pg_dump aborts on a
    newer server). The image installs the client of that major version or newer."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    server = re.fullmatch(r"postgres:(\d+)(?:[.-].*)?", compose["services"]["postgres"]["image"])
    assert server, compose["services"]["postgres"]["image"]
    version = re.search(r"ARG PG_CLIENT_VERSION=(\d+)", text)
    assert version and int(version.group(1)) >= int(server.group(1)), "pg_dump older than the compose's PostgreSQL"
    install = next(line for line in text.splitlines() if "postgresql-client-${PG_CLIENT_VERSION}" in line)
    # Debian's own repository stops at 15: the PostgreSQL project's is set up first, in the same layer.
    assert install.index("apt.postgresql.org.sh") < install.index("postgresql-client-${PG_CLIENT_VERSION}")
    assert "postgresql-common" in install.split("apt.postgresql.org.sh")[0]
