"""The ``vivoflow`` command line as a user runs it: try, simulate, runs, help.

Each command is a real subprocess against a real config, SMTP server and (where needed) a running vivoflow.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import FIXTURES, Vivoflow
from tests.smtp_server import SmtpSink

SHIPPED = Path(__file__).resolve().parents[1] / "recipes"
POSTED = re.compile(r"^(?P<event>\S+) \((?P<sample>\S+)\) -> (?P<status>\d{3}) (?P<body>\{.*\})$")
#: A recipe that fails at run time: a no-show names its invitee by URI only, so there is no address.
NO_SHOW_ALERT = """\
on: invitee_no_show.created
steps:
  - id: tell_invitee
    use: email.send
    with:
      to: "{{ invitee.email }}"
      subject: We missed you
      text: Book again?
"""


def vivoflow_cli(config: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def copy_shipped_recipes(folder: Path) -> None:
    for recipe in SHIPPED.glob("*.yaml"):
        shutil.copy(recipe, folder / recipe.name)


@pytest.fixture
def config(make_config: Callable[..., Path], smtp_sink: SmtpSink, recipes_dir: Path) -> Path:
    """A config with the shipped recipes and email pointed at the SMTP sink; nothing running."""
    copy_shipped_recipes(recipes_dir)
    return make_config(smtp_port=smtp_sink.port)


@pytest.fixture
def flow(make_config: Callable[..., Path], smtp_sink: SmtpSink, recipes_dir: Path) -> Iterator[Vivoflow]:
    """A running intake and worker with the shipped recipes plus one that always fails."""
    copy_shipped_recipes(recipes_dir)
    (recipes_dir / "no-show-alert.yaml").write_text(NO_SHOW_ALERT)
    with Vivoflow(make_config(smtp_port=smtp_sink.port)) as running:
        yield running


def posted(stdout: str) -> list[dict[str, Any]]:
    """The lines ``simulate`` prints, one per post: event, sample, status and the intake's JSON."""
    found = []
    for line in stdout.strip().splitlines():
        match = POSTED.match(line)
        assert match, line
        found.append({**match.groupdict(), "status": int(match["status"]), "body": json.loads(match["body"])})
    return found


# --- try -------------------------------------------------------------------------------------


def test_try_shows_the_match_and_rendered_inputs_and_sends_nothing(
    config: Path, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    result = vivoflow_cli(config, "try", "cancel-followup", "--event", "invitee.canceled", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("recipe cancel-followup on invitee.canceled: matches\n")
    assert "step win_back (email.send): would run" in out
    assert "to: jamie.rivera@example.com" in out
    assert "subject: Sorry we missed you, Jamie" in out
    assert 'You told us: "I have a conflict that day".' in out
    assert "step tell_team (email.send): would run" in out
    assert "subject: Discovery Call with Jamie Rivera canceled by Jamie Rivera" in out
    assert "dry run: nothing was sent" in out
    # The process has exited: anything it sent would have been accepted by now.
    assert smtp_sink.messages == []
    assert not (tmp_path / "data" / "outbox").exists()


def test_try_with_send_really_sends(config: Path, smtp_sink: SmtpSink, tmp_path: Path) -> None:
    result = vivoflow_cli(config, "try", "cancel-followup", "--event", "invitee.canceled", "--send", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "step win_back (email.send): sent" in result.stdout
    assert "dry run" not in result.stdout
    messages = smtp_sink.wait_for(2)
    assert sorted(m["To"] for m in messages) == ["Team <team@example.com>", "jamie.rivera@example.com"]


@pytest.mark.parametrize(("sample", "verdict"), [
    ("invitee.created", "on invitee.created: does not match (listens to invitee.canceled)"),
    ("invitee.canceled.rescheduled", "on invitee.canceled: does not match (if: not rescheduled is false)"),
])
def test_try_says_when_a_recipe_does_not_match(
    config: Path, smtp_sink: SmtpSink, tmp_path: Path, sample: str, verdict: str
) -> None:
    result = vivoflow_cli(config, "try", "cancel-followup", "--event", sample, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"recipe cancel-followup {verdict}"
    assert smtp_sink.messages == []


def test_try_reads_the_event_from_a_json_file(config: Path, smtp_sink: SmtpSink, tmp_path: Path) -> None:
    body = json.loads((FIXTURES / "invitee.canceled.json").read_text())
    body["payload"].update(name="Alex Doe", first_name="Alex", email="alex@example.com")
    body["payload"]["cancellation"]["reason"] = "Found another vendor"
    event_file = tmp_path / "my-event.json"
    event_file.write_text(json.dumps(body))

    result = vivoflow_cli(config, "try", "cancel-followup", "--event", str(event_file), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "to: alex@example.com" in result.stdout
    assert "subject: Sorry we missed you, Alex" in result.stdout
    assert 'You told us: "Found another vendor".' in result.stdout
    assert smtp_sink.messages == []


def test_try_reports_a_missing_recipe_or_a_bad_event_file_in_one_line(config: Path, tmp_path: Path) -> None:
    line = one_line_error(vivoflow_cli(config, "try", "nope", "--event", "invitee.canceled", cwd=tmp_path), 1)
    assert "no recipe named 'nope'" in line

    junk = tmp_path / "junk.json"
    junk.write_text('{"hello": "world"}')
    line = one_line_error(vivoflow_cli(config, "try", "cancel-followup", "--event", str(junk), cwd=tmp_path), 1)
    assert "not a webhook body" in line


# --- simulate --------------------------------------------------------------------------------


def test_simulate_posts_a_signed_sample_and_its_run_appears(flow: Vivoflow, tmp_path: Path) -> None:
    result = vivoflow_cli(flow.config_path, "simulate", "invitee.canceled", "--url", flow.webhook_url, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    [post] = posted(result.stdout)
    assert (post["event"], post["sample"], post["status"]) == ("invitee.canceled", "invitee.canceled", 202)
    assert post["body"]["duplicate"] is False
    runs = flow.wait_for_runs(post["body"]["delivery_id"])
    assert [(r["recipe"], r["status"]) for r in runs] == [("cancel-followup", "succeeded")]


def test_simulate_rescheduled_posts_both_halves_as_two_deliveries(flow: Vivoflow, tmp_path: Path) -> None:
    result = vivoflow_cli(flow.config_path, "simulate", "invitee.rescheduled", "--url", flow.webhook_url,
                          cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    posts = posted(result.stdout)
    assert [(p["event"], p["sample"], p["status"]) for p in posts] == [
        ("invitee.canceled", "invitee.canceled.rescheduled", 202),
        ("invitee.created", "invitee.created.rescheduled", 202),
    ]
    ids = {p["body"]["delivery_id"] for p in posts}
    assert len(ids) == 2
    for delivery_id in ids:
        assert flow.wait_processed(delivery_id)["event"] in ("invitee.canceled", "invitee.created")


def test_simulate_an_unknown_event_is_one_line_with_status_1(config: Path, tmp_path: Path) -> None:
    line = one_line_error(vivoflow_cli(config, "simulate", "nope", cwd=tmp_path), 1)

    assert "unknown event or sample 'nope'" in line and "invitee.canceled" in line


# --- runs ------------------------------------------------------------------------------------


@pytest.fixture
def two_runs(flow: Vivoflow) -> dict[str, str]:
    """One succeeded run (a cancellation) and one failed run (a no-show), by status."""
    ids = {}
    for sample, status in (("invitee.canceled", "succeeded"), ("invitee_no_show.created", "failed")):
        response = flow.post((FIXTURES / f"{sample}.json").read_bytes())
        assert response.status_code == 202
        [run] = flow.wait_for_runs(response.json()["delivery_id"])
        assert run["status"] == status
        ids[status] = run["id"]
    return ids


def run_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_runs_lists_runs_newest_first_and_filters_by_status_and_recipe(
    flow: Vivoflow, two_runs: dict[str, str], tmp_path: Path
) -> None:
    every = run_lines(vivoflow_cli(flow.config_path, "runs", cwd=tmp_path))
    assert [line.split()[0] for line in every] == [two_runs["failed"], two_runs["succeeded"]]
    assert "failed" in every[0] and "no-show-alert" in every[0] and "(invitee_no_show.created)" in every[0]
    assert "succeeded" in every[1] and "cancel-followup" in every[1] and "(invitee.canceled)" in every[1]

    failed = run_lines(vivoflow_cli(flow.config_path, "runs", "--status", "failed", cwd=tmp_path))
    assert [line.split()[0] for line in failed] == [two_runs["failed"]]
    by_recipe = run_lines(vivoflow_cli(flow.config_path, "runs", "--recipe", "cancel-followup", cwd=tmp_path))
    assert [line.split()[0] for line in by_recipe] == [two_runs["succeeded"]]
    none = run_lines(vivoflow_cli(flow.config_path, "runs", "--status", "scheduled", cwd=tmp_path))
    assert none == ["no runs match these filters"]


def test_runs_show_prints_each_step_with_its_inputs(
    flow: Vivoflow, two_runs: dict[str, str], tmp_path: Path
) -> None:
    out = vivoflow_cli(flow.config_path, "runs", "show", two_runs["succeeded"], cwd=tmp_path)

    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"run {two_runs['succeeded']}: succeeded\n")
    assert "recipe cancel-followup, event invitee.canceled" in out.stdout
    assert "step win_back (email.send): succeeded, 1 attempt(s)" in out.stdout
    assert "step tell_team (email.send): succeeded" in out.stdout
    inputs = [json.loads(line.split("input: ", 1)[1]) for line in out.stdout.splitlines()
              if line.strip().startswith("input: ")]
    assert [i["subject"] for i in inputs] == [
        "Sorry we missed you, Jamie", "Discovery Call with Jamie Rivera canceled by Jamie Rivera",
    ]
    assert inputs[0]["to"] == "jamie.rivera@example.com"

    failed = vivoflow_cli(flow.config_path, "runs", "show", two_runs["failed"], cwd=tmp_path)
    assert failed.returncode == 0, failed.stderr
    assert "step tell_invitee (email.send): failed" in failed.stdout
    assert "error: invalid input" in failed.stdout and "needs at least one address" in failed.stdout


def test_runs_show_of_an_unknown_run_is_one_line_with_status_1(config: Path, tmp_path: Path) -> None:
    line = one_line_error(vivoflow_cli(config, "runs", "show", "nope", cwd=tmp_path), 1)

    assert "no run 'nope'" in line


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "workers.cli", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"^  ([a-z-]+)\s", result.stdout.split("Commands:")[1], flags=re.M))
    assert {"run", "serve", "worker", "validate", "try", "simulate", "runs"} <= listed
