"""deploy/ without Docker or systemd: the files parse, their commands are the real CLI's, the config loads.

Nothing is started. Each ``command:`` of the compose file and each ``ExecStart=`` of the units is parsed
by the very click command ``vivoflow <command> --help`` documents (an unknown flag or a bad value fails
here as it would at start-up); the cluster config is loaded from the environment it documents; every
variable the config and the compose file read is described in deploy/README.md.
"""

from __future__ import annotations

import inspect
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from connectors.base import ConnectorRegistry
from workers.cli import cli
from workers.config import load_config
from workers.errors import ConfigError
from workers.runner import WorkerProcesses

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
CLUSTER_CONFIG = DEPLOY / "config.cluster.yaml"
UNITS = DEPLOY / "systemd"
VIVOFLOW_SERVICES = ("migrate", "intake", "worker")
#: ``${NAME}`` or ``${NAME:-default}`` (the config's and Compose's syntax), and ``${NAME:?message}`` (Compose's).
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:[-?][^}]*)?\}")
#: What the brief of this folder promises to document, beyond what the files themselves read.
DOCUMENTED = ("VIVOFLOW_CONFIG", "VIVOFLOW_LOG_FORMAT", "VIVOFLOW_BROKER_URL", "PROMETHEUS_MULTIPROC_DIR")


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def unit(name: str) -> dict[str, list[str]]:
    """A unit file as ``{key: [values…]}`` (systemd allows a key several times, e.g. ``Environment=``)."""
    entries: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{name}: not a key=value line: {line!r}"
        entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def variables(path: Path, *, optional: bool = True) -> set[str]:
    """The ``${NAME}`` a YAML file reads in its values (comments aside); only required ones unless ``optional``."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            found.update(m.group(1) for m in VARIABLE.finditer(node) if optional or not m.group(2))

    walk(yaml.safe_load(path.read_text()))
    return found


def seconds(value: str) -> float:
    """A systemd or Compose time span (``60s``, ``1min``, ``30``) in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) in ("m", "min") else 1)


def parse_cli(args: list[str]) -> click.Context:
    """Parse ``vivoflow ARGS`` as the real CLI would, down to the subcommand, without invoking anything."""
    ctx = cli.make_context("vivoflow", list(args))
    command: click.Command = cli
    while isinstance(command, click.Group):
        with warnings.catch_warnings():  # Click 8.2+ deprecates protected_args; 9.0 puts them in args
            warnings.simplefilter("ignore", DeprecationWarning)
            remaining = [*getattr(ctx, "protected_args", []), *ctx.args]
        assert remaining, f"`vivoflow {' '.join(args)}` names no subcommand"
        name, found, rest = command.resolve_command(ctx, remaining)
        assert found is not None and name is not None
        command = found
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


def compose_commands() -> list[tuple[str, list[str]]]:
    """``(service, argv after 'vivoflow')`` for every service running the vivoflow image."""
    services = compose()["services"]
    return [(name, list(services[name]["command"])) for name in VIVOFLOW_SERVICES]


def expand(command: str, env: dict[str, str]) -> str:
    """``${NAME}`` in an ``ExecStart=`` as systemd expands it (here from the unit's own ``Environment=``)."""
    return re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], command)


def unit_commands() -> list[tuple[str, list[str]]]:
    """``(unit, argv after 'vivoflow')`` for every unit, ``${VAR}`` replaced by the unit's own ``Environment=``."""
    commands = []
    for path in sorted(UNITS.glob("*.service")):
        entries = unit(path.name)
        env = dict(e.split("=", 1) for e in entries.get("Environment", []))
        [exec_start] = entries["ExecStart"]
        argv = shlex.split(expand(exec_start, env))
        assert argv[0].startswith("/") and argv[0].endswith("/vivoflow"), argv[0]
        commands.append((path.name, argv[1:]))
    return commands


ALL_COMMANDS = [*compose_commands(), *unit_commands()]


@pytest.mark.parametrize(("where", "argv"), ALL_COMMANDS, ids=[where for where, _ in ALL_COMMANDS])
def test_each_command_parses_with_the_real_cli_and_its_flags_are_in_its_help(where: str, argv: list[str]) -> None:
    ctx = parse_cli(argv)
    assert ctx.command_path in ("vivoflow serve", "vivoflow worker", "vivoflow db upgrade"), ctx.command_path
    path = ctx.command_path.split()[1:]
    help_text = CliRunner().invoke(cli, [*path, "--help"]).output
    for flag in (arg for arg in argv if arg.startswith("--")):
        assert flag in help_text, f"{where}: {flag} is not in `vivoflow {' '.join(path)} --help`"
    if ctx.command_path == "vivoflow worker":
        assert ctx.params["processes"] and ctx.params["processes"] >= 1


def test_the_installed_entry_point_lists_the_commands_the_deployment_uses() -> None:
    script = Path(sys.executable).with_name("vivoflow")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "workers.cli"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in ("serve", "worker", "db"):
        assert re.search(rf"^\s+{name}\s", result.stdout, re.M), result.stdout


def test_compose_file_orders_the_services_and_checks_the_intakes_health() -> None:
    data = compose()
    services = data["services"]
    assert set(services) == {"redis", "postgres", "migrate", "intake", "worker"}
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("intake", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    for name in VIVOFLOW_SERVICES:  # one image, one config, the same environment
        assert services[name]["image"] == "vivoflow:latest"
        assert services[name]["environment"]["VIVOFLOW_CONFIG"] == "/etc/vivoflow/config.yaml"
        assert "./config.cluster.yaml:/etc/vivoflow/config.yaml:ro" in services[name]["volumes"]
    assert (COMPOSE.parent / services["intake"]["build"]["dockerfile"].removeprefix("deploy/")).is_file()
    check = services["intake"]["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"]
    compile(check[3], "healthcheck", "exec")  # the one-liner is valid Python
    assert "/healthz" in check[3] and "/readyz" in check[3]
    for name in ("redis", "postgres"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    # Long enough for a graceful stop: a worker's children finish their messages, the supervisor waits.
    supervisor_wait = inspect.signature(WorkerProcesses.stop).parameters["timeout"].default
    assert services["worker"]["stop_signal"] == "SIGTERM"
    assert seconds(services["worker"]["stop_grace_period"]) > supervisor_wait


def test_units_depend_on_the_migration_and_stop_gracefully() -> None:
    assert {p.name for p in UNITS.glob("*.service")} == {
        "vivoflow-migrate.service", "vivoflow-intake.service", "vivoflow-worker@.service"}
    migrate = unit("vivoflow-migrate.service")
    assert migrate["Type"] == ["oneshot"] and migrate["RemainAfterExit"] == ["yes"]
    supervisor_wait = inspect.signature(WorkerProcesses.stop).parameters["timeout"].default
    for name, stop_within in (("vivoflow-intake.service", 10), ("vivoflow-worker@.service", supervisor_wait)):
        entries = unit(name)
        assert entries["Requires"] == ["vivoflow-migrate.service"]
        assert "vivoflow-migrate.service" in entries["After"][0].split()
        assert entries["Restart"] == ["on-failure"]
        assert entries["KillSignal"] == ["SIGTERM"] and entries["KillMode"] == ["mixed"]
        assert seconds(entries["TimeoutStopSec"][0]) > stop_within
        assert "VIVOFLOW_CONFIG=/etc/vivoflow/config.yaml" in entries["Environment"]
        assert "PROMETHEUS_MULTIPROC_DIR=/run/vivoflow" in entries["Environment"]
        assert entries["RuntimeDirectory"] == ["vivoflow"] and entries["RuntimeDirectoryPreserve"] == ["yes"]
    assert "%i" in (UNITS / "vivoflow-worker@.service").read_text()


CLUSTER_ENV = {
    "VIVOCALENDAR_SIGNING_KEY": "cluster-signing-key",
    "VIVOFLOW_ADMIN_TOKEN": "cluster-admin-token",
    "VIVOFLOW_BROKER_URL": "amqp://vivoflow:secret@rabbitmq:5672/%2F",
    "VIVOFLOW_STORE_URL": "postgresql://vivoflow:secret@postgres:5432/vivoflow",
}


def test_the_cluster_config_loads_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in variables(CLUSTER_CONFIG):
        monkeypatch.delenv(name, raising=False)
    for name, value in CLUSTER_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VIVOFLOW_INTAKE_PORT", "8081")
    monkeypatch.setenv("SMTP_FROM", "")  # set but empty: the default, as in Compose

    config = load_config(CLUSTER_CONFIG)

    assert (config.intake.host, config.intake.port) == ("0.0.0.0", 8081)
    assert config.intake.keys() == [b"cluster-signing-key"]
    assert config.broker.url == CLUSTER_ENV["VIVOFLOW_BROKER_URL"]
    assert config.store_url() == CLUSTER_ENV["VIVOFLOW_STORE_URL"]
    assert config.admin.token.get_secret_value() == "cluster-admin-token"
    assert (config.workers.processes, config.workers.threads) == (2, 8)
    assert config.broker.data_dir == Path("/var/lib/vivoflow")
    assert config.recipes.dir == Path("/etc/vivoflow/recipes")
    registry = ConnectorRegistry.discover()
    registry.configure(config.connectors, base_dir=config.base_dir)  # what `vivoflow validate` checks
    email = registry.config_of("email")
    assert email.outbox_dir == Path("/var/lib/vivoflow/outbox")  # type: ignore[union-attr]
    assert email.from_ == "Team <noreply@example.com>"  # type: ignore[union-attr]

    monkeypatch.delenv("VIVOFLOW_STORE_URL")
    with pytest.raises(ConfigError, match=r"store\.url: environment variable VIVOFLOW_STORE_URL is not set"):
        load_config(CLUSTER_CONFIG)


def test_compose_passes_every_variable_the_config_requires() -> None:
    required = variables(CLUSTER_CONFIG, optional=False)
    environment = compose()["x-vivoflow"]["environment"]
    assert required <= set(environment), required - set(environment)


def test_every_variable_is_documented() -> None:
    readme = (DEPLOY / "README.md").read_text()
    example = (DEPLOY / "vivoflow.env.example").read_text()
    in_config = variables(CLUSTER_CONFIG)
    in_compose = {*compose()["x-vivoflow"]["environment"], *variables(COMPOSE)}
    for name in sorted(in_config | in_compose | set(DOCUMENTED)):
        assert f"`{name}`" in readme, f"{name} is not described in deploy/README.md"
    for name in sorted(in_config | {"POSTGRES_PASSWORD"}):
        assert re.search(rf"^#? ?{name}=", example, re.M), f"{name} is not in deploy/vivoflow.env.example"
