"""config.yaml: defaults, ${VAR} interpolation, paths relative to the file, one-line key-path errors.

The CLI part runs the real ``vivoflow`` as a subprocess: exit codes and stderr as a user sees them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from connectors.base import ConnectorRegistry
from workers.config import Config, load_config
from workers.errors import ConfigError

VENV_SCRIPT = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "vivoflow"
LAUNCHERS = {
    "python-m": [sys.executable, "-m", "workers.cli"],
    "console-script": [str(VENV_SCRIPT)],
}
GOOD_RECIPE = """\
on: invitee.created
steps:
  - id: note
    use: log.write
    with: {message: "{{ invitee.email }}"}
"""


def write_config(folder: Path, text: str, name: str = "config.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 2
    return message


def test_an_empty_file_gives_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, ""))

    assert (config.intake.host, config.intake.port, config.intake.path) == (
        "127.0.0.1", 8000, "/webhooks/vivocalendar")
    assert (config.intake.tolerance_seconds, config.intake.max_body_bytes) == (180, 1_048_576)
    assert config.broker.url == "embedded"
    assert (config.workers.processes, config.workers.threads) == (1, 8)
    assert config.admin.token.get_secret_value() == ""
    assert config.recipes.dir == tmp_path / "recipes"
    assert config.broker.data_dir == tmp_path / "data"
    assert config.store_url() == f"sqlite:///{tmp_path / 'data' / 'vivoflow.db'}"


def test_the_shipped_config_loads_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VIVOCALENDAR_SIGNING_KEY", "VIVOFLOW_ADMIN_TOKEN", "SMTP_HOST"):
        monkeypatch.delenv(name, raising=False)
    shipped = Path(__file__).resolve().parents[1] / "config.yaml"

    config = load_config(shipped)

    assert config.intake.signing_key.get_secret_value() == "dev-signing-key"
    assert config.recipes.dir == shipped.parent / "recipes"


def test_relative_paths_hang_from_the_config_files_folder_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "conf", """\
        broker: {data_dir: ../state}
        store: {url: "sqlite:///db/runs.db"}
        recipes: {dir: ./my-recipes}
        connectors:
          email: {outbox_dir: mail/out}
        """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(path)
    registry = ConnectorRegistry.discover()
    registry.configure(config.connectors, base_dir=config.base_dir)

    conf = tmp_path / "conf"
    assert config.recipes.dir == conf / "my-recipes"
    assert config.broker.data_dir == tmp_path / "state"
    assert config.store_url() == f"sqlite:///{conf / 'db' / 'runs.db'}"
    assert registry.instance("email").config.outbox_dir == conf / "mail" / "out"  # type: ignore[attr-defined]


@pytest.mark.parametrize("url", ["sqlite:////var/lib/vivoflow.db", "sqlite:///:memory:", "postgresql://u@db/vivoflow"])
def test_absolute_and_non_file_store_urls_are_kept(tmp_path: Path, url: str) -> None:
    config = load_config(write_config(tmp_path, f'store: {{url: "{url}"}}\n'))

    assert config.store_url() == url


@pytest.mark.parametrize(("env", "written", "expected"), [
    ({"VF_HOST": "10.0.0.5"}, "${VF_HOST}", "10.0.0.5"),
    ({"VF_HOST": "10.0.0.5"}, "${VF_HOST:-0.0.0.0}", "10.0.0.5"),
    ({}, "${VF_HOST:-0.0.0.0}", "0.0.0.0"),
    ({}, "${VF_HOST:-}", ""),
    ({"VF_HOST": ""}, "${VF_HOST:-0.0.0.0}", "0.0.0.0"),  # as in the shell: empty takes the default
    ({"VF_HOST": ""}, "${VF_HOST}", ""),
    ({"VF_HOST": "a", "VF_SUFFIX": "b"}, "host-${VF_HOST}.${VF_SUFFIX:-x}.local", "host-a.b.local"),
])
def test_environment_variables_are_replaced_before_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], written: str, expected: str
) -> None:
    for name in ("VF_HOST", "VF_SUFFIX"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    config = load_config(write_config(tmp_path, f'intake: {{host: "{written}"}}\n'))

    assert config.intake.host == expected


def test_interpolated_values_are_then_validated_with_their_types(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VF_PORT", "9100")
    monkeypatch.setenv("VF_KEY", "s3cret")
    monkeypatch.delenv("VF_THREADS", raising=False)

    config = load_config(write_config(tmp_path, """\
        intake: {port: "${VF_PORT}", signing_keys: ["${VF_KEY}"]}
        workers: {threads: "${VF_THREADS:-3}"}
        connectors: {slack: {token: "${VF_KEY}"}}
        """))

    assert (config.intake.port, config.workers.threads) == (9100, 3)
    assert config.intake.keys() == [b"s3cret"]
    assert config.connectors["slack"] == {"token": "s3cret"}


@pytest.mark.parametrize(("text", "key_path"), [
    ('intake: {signing_key: "${VF_MISSING}"}\n', "intake.signing_key"),
    ('intake: {signing_keys: [a, "x-${VF_MISSING}"]}\n', "intake.signing_keys.1"),
    ('connectors: {email: {password: "${VF_MISSING}"}}\n', "connectors.email.password"),
])
def test_a_missing_variable_without_default_names_the_key_and_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, key_path: str
) -> None:
    monkeypatch.delenv("VF_MISSING", raising=False)
    path = write_config(tmp_path, text)

    message = config_error(path)

    assert message.startswith(f"{path}: {key_path}: environment variable VF_MISSING is not set")


@pytest.mark.parametrize(("text", "expected"), [
    ("intake: {colour: red}\n", "intake.colour: unknown key"),
    ("colour: red\n", "colour: unknown key"),
    ("workers: {threads: 2, procs: 3}\n", "workers.procs: unknown key"),
    ("intake: {port: lots}\n", "intake.port: Input should be a valid integer"),
    ("intake: {port: 70000}\n", "intake.port: Input should be less than or equal to 65535"),
    ("workers: {threads: 0}\n", "workers.threads: Input should be greater than or equal to 1"),
    ("intake: {path: webhooks}\n", "intake.path: must start with /"),
    ("broker: {url: 'http://redis'}\n", "broker.url: must be 'embedded', a redis://"),
    ("intake: [1, 2]\n", "intake: Input should be a valid dictionary"),
])
def test_a_bad_key_or_value_is_one_line_naming_its_key_path(tmp_path: Path, text: str, expected: str) -> None:
    path = write_config(tmp_path, text)

    assert config_error(path).startswith(f"{path}: {expected}")


@pytest.mark.parametrize(("text", "expected"), [
    ("intake: {port: 1\n", ": not valid YAML"),
    ("- just\n- a list\n", ": the top level must be a mapping of sections"),
])
def test_a_file_that_is_not_a_mapping_of_sections_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in config_error(write_config(tmp_path, text))


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    assert "cannot read the config file" in config_error(tmp_path / "absent.yaml")


def test_vivoflow_config_variable_picks_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIVOFLOW_CONFIG", str(write_config(tmp_path, "intake: {port: 8123}\n", "other.yaml")))

    config = load_config()

    assert isinstance(config, Config) and config.intake.port == 8123


@pytest.mark.parametrize(("sections", "expected"), [
    ({"email": {"colour": "red"}}, "connectors.email.colour: unknown key"),
    ({"email": {"port": "smtp"}}, "connectors.email.port: Input should be a valid integer"),
    ({"email": {"from": "a@x.com, b@x.com"}}, "connectors.email.from: must be exactly one address"),
    ({"nope": {}}, "connectors.nope: unknown connector"),
])
def test_connector_sections_are_validated_by_their_own_models(
    tmp_path: Path, sections: dict[str, dict[str, str]], expected: str
) -> None:
    registry = ConnectorRegistry.discover()

    with pytest.raises(ConfigError) as caught:
        registry.configure(sections, base_dir=tmp_path)

    assert str(caught.value).startswith(expected)


# --- through the real command line -----------------------------------------------------------


def run_cli(launcher: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIVOFLOW_CONFIG", "VF_MISSING")}
    return subprocess.run([*LAUNCHERS[launcher], *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_cli_reports_a_missing_variable_in_one_line_with_status_2(tmp_path: Path, launcher: str) -> None:
    path = write_config(tmp_path, 'intake: {signing_key: "${VF_MISSING}"}\n')

    line = assert_one_line_error(run_cli(launcher, "--config", str(path), "validate", cwd=tmp_path), 2)

    assert "intake.signing_key" in line and "VF_MISSING" in line


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_cli_validate_lists_file_line_errors_and_exits_1(tmp_path: Path, launcher: str) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "good.yaml").write_text(GOOD_RECIPE)
    (recipes / "typo.yaml").write_text(GOOD_RECIPE.replace("invitee.email", "invitee.emial"))
    (recipes / "event.yaml").write_text(GOOD_RECIPE.replace("invitee.created", "invitee.booked"))
    path = write_config(tmp_path, "recipes: {dir: recipes}\n")

    result = run_cli(launcher, "--config", str(path), "validate", cwd=tmp_path)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(result.stderr.strip().splitlines()) == [
        f"{recipes / 'event.yaml'}:1: on: unknown event 'invitee.booked' (events: invitee.created, "
        "invitee.canceled, routing_form_submission.created, invitee_no_show.created, invitee_no_show.deleted, "
        "invitee.rescheduled)",
        f"{recipes / 'typo.yaml'}:5: steps.note.with.message: invitee.emial: no such field (known: name, "
        "first_name, last_name, email, timezone, uri, cancel_url, reschedule_url, answers)",
    ]


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_cli_validate_passes_a_good_folder_with_status_0(tmp_path: Path, launcher: str) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "good.yaml").write_text(GOOD_RECIPE)
    path = write_config(tmp_path, "recipes: {dir: recipes}\n")

    result = run_cli(launcher, "--config", str(path), "validate", cwd=tmp_path)

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.strip() == "ok: config and 1 recipe(s): good"


def test_cli_validate_checks_the_files_it_is_given(tmp_path: Path) -> None:
    path = write_config(tmp_path, "recipes: {dir: recipes}\n")
    (tmp_path / "recipes").mkdir()
    one = tmp_path / "one.yaml"
    one.write_text(GOOD_RECIPE.replace("log.write", "log.shout"))

    line = assert_one_line_error(run_cli("python-m", "--config", str(path), "validate", str(one), cwd=tmp_path), 1)

    assert line.startswith(f"{one}:4: use: unknown action 'log.shout'")


@pytest.mark.parametrize(("text", "expected"), [
    ("intake: {colour: red}\n", "intake.colour: unknown key"),
    ("connectors: {email: {colour: red}}\n", "connectors.email.colour: unknown key"),
])
def test_cli_reports_a_bad_config_key_in_one_line_with_status_2(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "recipes").mkdir()
    path = write_config(tmp_path, text)

    line = assert_one_line_error(run_cli("python-m", "--config", str(path), "validate", cwd=tmp_path), 2)

    assert expected in line


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_cli_unknown_command_is_one_line_with_status_2(tmp_path: Path, launcher: str) -> None:
    line = assert_one_line_error(run_cli(launcher, "frobnicate", cwd=tmp_path), 2)

    assert "frobnicate" in line
