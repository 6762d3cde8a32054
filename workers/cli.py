"""The ``vivoflow`` command line.

Every expected failure is one line on stderr and exit status 1 (the operation
failed) or 2 (bad usage or configuration); only a bug prints a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx
import yaml

from workers.config import Config, load_config
from workers.errors import ConfigError, RecipeError, VivoflowError
from workers.logs import setup_logging
from workers.vivocalendar_cli import sso_link, subscribe, subscriptions

log = logging.getLogger("vivoflow")


#: Commands that keep running, whose INFO log is their output; the others print results, not logs.
LONG_RUNNING = ("run", "serve", "worker")


class Ctx:
    """What the group parses once for every command: where the config is."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path

    def config(self) -> Config:
        return load_config(self.config_path)

    def app(self, broker_url: str | None = None) -> Any:
        from workers.app import App

        return App(self.config(), broker_url=broker_url or os.environ.get("VIVOFLOW_BROKER_URL"))


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", metavar="PATH", envvar="VIVOFLOW_CONFIG",
              help="Config file (default: ./config.yaml, or $VIVOFLOW_CONFIG).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", envvar="VIVOFLOW_LOG_FORMAT",
              show_default=True, help="json: one object per line, with delivery, run and step ids.")
@click.pass_context
def cli(click_ctx: click.Context, config_path: str | None, verbose: bool, log_format: str) -> None:
    """vivoflow: run YAML recipes when Vivocalendar bookings are made, canceled or rescheduled.

    \b
    Start everything:            vivoflow run
    Post a sample webhook:       vivoflow simulate invitee.canceled
    Check your recipes:          vivoflow validate
    Dry-run one recipe:          vivoflow try cancel-followup --event invitee.canceled
    See what ran:                vivoflow runs
    """
    # A one-shot command's error must be the one line on stderr, not follow "recipes loaded…" lines.
    quiet = click_ctx.invoked_subcommand not in LONG_RUNNING
    os.environ["VIVOFLOW_LOG_FORMAT"] = log_format  # worker processes started by `run` log alike
    setup_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO, log_format)
    click_ctx.obj = Ctx(config_path)


# --- processes -------------------------------------------------------------------------------


@cli.command()
@pass_ctx
def run(ctx: Ctx) -> None:
    """Intake, workers and the embedded broker in one command (the main job)."""
    config = ctx.config()
    share_metrics(config.broker.data_dir / "metrics")
    from workers.runner import run_all  # after share_metrics: it imports prometheus-client

    run_all(config)


def share_metrics(folder: Path) -> None:
    """Have this process (and its children) count into one folder, so /metrics sees them all.

    Must run before prometheus-client is imported (it reads the variable then); a folder set
    in the environment already (systemd units) wins. Files of processes that have exited
    are removed (counters start from zero after a restart, as Prometheus expects); those of
    live processes sharing the folder are kept.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        pid = stale.stem.rpartition("_")[2]  # prometheus-client names them <kind>_<pid>.db
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            stale.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


@cli.command()
@pass_ctx
def serve(ctx: Ctx) -> None:
    """The intake alone (scale out: point it at a shared broker.url)."""
    config = ctx.config()
    share_metrics(config.broker.data_dir / "metrics")
    from workers.runner import serve as serve_intake

    app = ctx.app()
    app.broker  # noqa: B018 - fail now, in one line, if the broker cannot be found
    serve_intake(app)


@cli.command()
@click.option("--processes", type=click.IntRange(min=1), help="Worker processes (default: workers.processes).")
@click.option("--threads", type=click.IntRange(min=1), help="Threads per process (default: workers.threads).")
@pass_ctx
def worker(ctx: Ctx, processes: int | None, threads: int | None) -> None:
    """Workers alone: consume the queue and run recipes."""
    config = ctx.config()
    share_metrics(config.broker.data_dir / "metrics")
    from workers.runner import BROKER_URL_ENV, WorkerProcesses, stop_on_signals, work

    processes = processes or config.workers.processes or 1
    threads = threads or config.workers.threads
    stop = threading.Event()
    stop_on_signals(stop)
    if processes == 1:
        work(ctx.app(), threads, stop)
        return
    from workers.broker import redis_url

    # Resolved once here, so every child connects to the same broker (or none starts).
    url = redis_url(config.broker, os.environ.get(BROKER_URL_ENV))
    children = WorkerProcesses(config, url, processes, threads)
    children.start()
    stop.wait()
    children.stop()


# --- recipes ---------------------------------------------------------------------------------


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@pass_ctx
def validate(ctx: Ctx, paths: tuple[Path, ...]) -> None:
    """Check the config and recipes (default: recipes.dir); prints file:line: message per problem."""
    from connectors.base import ConnectorRegistry
    from workers.recipes import load_book, load_recipe, recipe_files
    from workers.templating import Templates

    config = ctx.config()
    registry = ConnectorRegistry.discover()
    registry.configure(config.connectors, base_dir=config.base_dir)
    templates = Templates()
    files: list[Path] = []
    for path in paths or (config.recipes.dir,):
        if path.is_dir():
            files.extend(recipe_files(path))
        elif path.exists():
            files.append(path)
        else:
            raise click.UsageError(f"{path}: no such file or folder")
    errors: list[RecipeError] = []
    names: list[str] = []
    if not paths:
        book = load_book(config.recipes.dir, registry, templates)
        errors, names = book.errors, list(book.recipes)
    else:
        for file in files:
            recipe, errs = load_recipe(file, registry, templates)
            errors.extend(errs)
            names += [recipe.name] if recipe else []
    for err in errors:
        click.echo(str(err), err=True)
    if errors:
        sys.exit(1)
    click.echo(f"ok: config and {len(names)} recipe(s): {', '.join(names) or 'none'}")


def _resolve_recipe(app: Any, name: str) -> Any:
    from workers.recipes import RECIPE_SUFFIXES, load_recipe

    path = Path(name)
    if path.suffix in RECIPE_SUFFIXES and path.exists():
        recipe, errors = load_recipe(path, app.registry, app.templates)
        if errors:
            raise VivoflowError("; ".join(map(str, errors)))
        return recipe
    book = app.recipes.current()
    if name in book.recipes:
        return book.recipes[name]
    broken = [str(e) for e in book.errors if Path(e.file).stem == name]
    if broken:
        raise VivoflowError(broken[0])
    raise VivoflowError(f"no recipe named {name!r} (recipes: {', '.join(book.recipes) or 'none'})")


def _load_event(event: str) -> tuple[bytes, Any]:
    from workers.events import Envelope
    from workers.samples import load_sample, samples_for

    path = Path(event)
    if path.is_file():
        body = path.read_bytes()
    else:
        names = samples_for(event)
        body = json.dumps(load_sample(names[0])).encode()
    try:
        return body, Envelope.model_validate_json(body)
    except ValueError as exc:
        raise VivoflowError(f"{event}: not a webhook body ({str(exc).splitlines()[0]})") from None


@cli.command("try")
@click.argument("recipe")
@click.option("--event", "event", required=True, metavar="FILE|EVENT",
              help="A webhook body (JSON file), or a sample's name such as invitee.canceled.")
@click.option("--send", is_flag=True, help="Really call the connectors (emails go out!).")
@pass_ctx
def try_(ctx: Ctx, recipe: str, event: str, send: bool) -> None:
    """Dry-run RECIPE (a name or a .yaml file) on one event: match, then each step's inputs."""
    from workers.trial import trial

    app = ctx.app()
    compiled = _resolve_recipe(app, recipe)
    _, envelope = _load_event(event)
    result = trial(compiled, envelope, app.registry, send=send)
    verdict = "matches" if result.matched else "does not match"
    click.echo(f"recipe {result.recipe} on {result.event}: {verdict}{f' ({result.reason})' if result.reason else ''}")
    for step in result.steps:
        click.echo(f"\nstep {step.id} ({step.use}): {step.status}{' - ' + step.note if step.note else ''}")
        if step.inputs is not None:
            click.echo(_indent(yaml.safe_dump(step.inputs, sort_keys=False, allow_unicode=True, width=100)))
        if step.output is not None:
            click.echo(_indent("output: " + json.dumps(step.output)))
    if result.matched and not send:
        click.echo("\n(dry run: nothing was sent; add --send to really send)")
    if any(s.status == "failed" for s in result.steps):
        sys.exit(1)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


@cli.command()
@click.argument("event")
@click.option("--url", help="Intake URL (default: from config.yaml).")
@click.option("--exact", is_flag=True, help="Post the sample byte for byte (a second post is then a duplicate).")
@pass_ctx
def simulate(ctx: Ctx, event: str, url: str | None, exact: bool) -> None:
    """Post a signed sample webhook of EVENT to the intake (invitee.rescheduled posts both halves).

    Each post gets a fresh created_at, so it is a new delivery unless --exact.
    """
    from workers.samples import load_sample, samples_for
    from workers.signing import sign

    config = ctx.config()
    keys = config.intake.keys()
    if not keys:
        raise ConfigError("intake.signing_key is empty: simulate signs with it")
    target = url or f"http://{config.intake.host}:{config.intake.port}{config.intake.path}"
    failed = False
    with httpx.Client(timeout=10) as client:
        for name in samples_for(event):
            data = load_sample(name)
            if not exact:
                data["created_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            body = json.dumps(data, indent=2).encode()
            try:
                response = client.post(target, content=body, headers={
                    "Content-Type": "application/json",
                    "Vivocalendar-Webhook-Signature": sign(body, keys[0]),
                })
            except httpx.HTTPError as exc:
                raise VivoflowError(f"cannot reach {target} ({exc}): is vivoflow running? (make run)") from None
            click.echo(f"{data['event']} ({name}) -> {response.status_code} {response.text}")
            failed |= response.status_code >= 300
    if failed:
        sys.exit(1)


@cli.command()
@click.option("--since", default="24h", show_default=True, metavar="DURATION",
              help="How far back to look for bookings and cancellations (30m, 24h, 2d…).")
@pass_ctx
def reconcile(ctx: Ctx, since: str) -> None:
    """Find bookings and cancellations no webhook delivered (through the API) and run them, once."""
    from workers.durations import parse_duration
    from workers.reconcile import reconcile as run_reconcile
    from workers.vivocalendar_cli import api_session

    try:
        window = parse_duration(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    config = ctx.config()
    app = ctx.app()
    with api_session(config) as api:
        report = run_reconcile(app, api, since=window, horizon=config.reconcile.horizon)
    for found in report.found:
        where = "queued" if found.enqueued else "stored (runs when `vivoflow run` starts)"
        click.echo(f"{found.event} {found.invitee_uri} -> {found.delivery_id} {where}")
    click.echo(f"checked {report.checked} invitee(s) of the last {since}: "
               f"{len(report.found)} booking event(s) no webhook delivered")


@cli.command()
@click.argument("delivery_id", required=False)
@click.option("--run", "run_id", metavar="RUN_ID", help="Replay one run instead of a whole delivery.")
@click.option("--resume", is_flag=True, help="With --run: re-run only its steps that did not succeed (the default).")
@click.option("--force", is_flag=True, help="With --run: re-run every step, succeeded ones too, as a new run.")
@click.option("--failed", is_flag=True, help="Resume every failed run of the last --since.")
@click.option("--since", default="24h", show_default=True, metavar="DURATION", help="With --failed: how far back.")
@click.option("--rate", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
              help="With --failed: at most this many replays a second.")
@click.option("--recipe", help="Replay only this recipe's run(s).")
@click.option("--by", "who", default=None, help="Who asks (recorded; default: your user name).")
@pass_ctx
def replay(ctx: Ctx, delivery_id: str | None, run_id: str | None, resume: bool, force: bool, failed: bool,
           since: str, rate: float, recipe: str | None, who: str | None) -> None:
    """Run a stored delivery again against today's recipes, or resume failed runs.

    \b
    vivoflow replay DELIVERY_ID            new runs of every matching recipe, linked to the old ones
    vivoflow replay --run RUN_ID           the steps of a failed run that did not succeed
    vivoflow replay --run RUN_ID --force   every step again, as a new run
    vivoflow replay --failed --since 24h   resume every recent failed run, --rate per second
    """
    import getpass

    from workers.replay import Replayer

    modes = [bool(delivery_id), bool(run_id), failed]
    if sum(modes) != 1:
        raise click.UsageError("give exactly one of DELIVERY_ID, --run RUN_ID or --failed")
    if (resume or force) and not run_id:
        raise click.UsageError("--resume and --force go with --run")
    if resume and force:
        raise click.UsageError("--resume and --force exclude each other")
    replayer = Replayer(ctx.app(), who=who or getpass.getuser())
    if delivery_id:
        click.echo(replayer.delivery(delivery_id, recipe=recipe))
    elif run_id:
        click.echo(replayer.run(run_id, force=force))
    else:
        from workers.durations import parse_duration

        try:
            window = parse_duration(since)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from None
        total = 0
        for line in replayer.failed(window, rate=rate, recipe=recipe):
            total += 1
            click.echo(line)
        click.echo(f"{total} failed run(s) resumed")


@cli.group()
def db() -> None:
    """The run store's schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Migrate up to this revision.")
@pass_ctx
def db_upgrade(ctx: Ctx, revision: str) -> None:
    """Apply the store's migrations (run, serve and worker also do it at start)."""
    from workers.store import Store, upgrade

    store = Store(ctx.config().store_url())
    upgrade(store.engine, revision)  # a database that does not answer: one line, from main()
    click.echo(f"store at {revision}: {store.engine.url.render_as_string(hide_password=True)}")


# --- history ---------------------------------------------------------------------------------


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@cli.group(invoke_without_command=True)
@click.option("--status", type=click.Choice(["queued", "running", "succeeded", "failed", "skipped", "scheduled"]))
@click.option("--recipe", help="Only runs of this recipe.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.pass_context
def runs(click_ctx: click.Context, status: str | None, recipe: str | None, limit: int) -> None:
    """Recent runs, newest first; `runs show ID` for one run's steps."""
    if click_ctx.invoked_subcommand:
        return
    from workers.store import Store

    store = Store(click_ctx.obj.config().store_url())
    store.create_schema()
    rows = store.page_runs(status=status, recipe=recipe, limit=limit)
    if not rows:
        click.echo("no runs match these filters" if status or recipe else "no runs yet")
        return
    for row in rows:
        reason = f"  {row['reason']}" if row["reason"] else ""
        click.echo(f"{row['id']}  {_when(row['created_at'])}  {row['status']:<9}  {row['recipe']}  "
                   f"({row['event']}){reason}")


@runs.command("show")
@click.argument("run_id")
@pass_ctx
def runs_show(ctx: Ctx, run_id: str) -> None:
    """One run: its delivery, status and every step's inputs, output or error."""
    from workers.store import Store

    store = Store(ctx.config().store_url())
    store.create_schema()
    run_ = store.get_run(run_id)
    if run_ is None:
        raise VivoflowError(f"no run {run_id!r} (see `vivoflow runs`)")
    click.echo(f"run {run_['id']}: {run_['status']}{' - ' + run_['reason'] if run_['reason'] else ''}")
    delivery = store.get_delivery(run_["delivery_id"]) or {}
    source = " (found by reconcile: no webhook delivered it)" if delivery.get("source") == "reconcile" else ""
    click.echo(f"  recipe {run_['recipe']}, event {run_['event']}, delivery {run_['delivery_id']}{source}")
    click.echo(f"  created {_when(run_['created_at'])}, finished {_when(run_['finished_at'])}")
    if run_["replay_id"]:
        click.echo(f"  replay {run_['replay_id']}" + (f" of run {run_['replay_of']}" if run_["replay_of"] else ""))
    for replay_ in store.replays_of(run_id):
        click.echo(f"  replayed ({replay_['mode']}) by {replay_['who']} at {_when(replay_['created_at'])}: "
                   f"{replay_['id']}")
    for step in store.steps_of(run_id):
        took = ""
        if step["started_at"] and step["finished_at"]:
            took = f", {(step['finished_at'] - step['started_at']) * 1000:.0f} ms"
        click.echo(f"\n  step {step['step_id']} ({step['use']}): {step['status']}, "
                   f"{step['attempts']} attempt(s){took}")
        if step["due_at"] and step["status"] == "scheduled":
            click.echo(f"    due {_when(step['due_at'])}")
        if step["input"] is not None:
            click.echo("    input: " + json.dumps(step["input"], ensure_ascii=False))
        if step["output"] is not None:
            click.echo("    output: " + json.dumps(step["output"], ensure_ascii=False))
        if step["error"]:
            click.echo(f"    error: {step['error']}")


for _command in (subscribe, subscriptions, sso_link):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns expected errors into one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="vivoflow", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        click.echo(f"vivoflow: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"vivoflow: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except VivoflowError as exc:
        click.echo(f"vivoflow: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        unreachable = _unreachable(exc)
        if unreachable is None:
            raise  # a bug: keep its traceback
        click.echo(f"vivoflow: {unreachable}", err=True)
        sys.exit(1)


def _unreachable(exc: Exception) -> str | None:
    """A store or broker that does not answer, in one line (the libraries are looked up, not imported)."""
    sa_exc, redis_exc, dramatiq_exc = (sys.modules.get(m) for m in ("sqlalchemy.exc", "redis.exceptions",
                                                                      "dramatiq.errors"))
    if sa_exc and isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        detail = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        return f"store.url: cannot reach the database ({detail})"
    if redis_exc and isinstance(exc, redis_exc.ConnectionError | redis_exc.TimeoutError) or (
            dramatiq_exc and isinstance(exc, dramatiq_exc.BrokerConnectionError)):
        return f"broker.url: cannot reach the broker ({str(exc).strip().splitlines()[0]})"
    return None


if __name__ == "__main__":
    main()
