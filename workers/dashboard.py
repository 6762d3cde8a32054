"""The dashboard: run history pages and the JSON API behind them, on the intake's port (SPEC §10).

Read-mostly views over the store plus one action, replay. Who may look is decided
in one place, ``workers.dashboard_access``; the OpenAPI document is
``workers.dashboard_openapi``. Pages are Jinja templates of their own
(``workers/templates``, not the recipe sandbox), autoescaped, readable without JavaScript.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from workers.app import App
from workers.dashboard_access import SESSION_COOKIE, SESSION_SECONDS, Access, Guard, Problem, read_fields
from workers.dashboard_openapi import openapi
from workers.durations import parse_duration
from workers.errors import VivoflowError
from workers.events import EVENTS
from workers.replay import Replayer
from workers.schema import STATUSES

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
#: How long a page keeps reloading itself while a replay it asked for has made no run yet.
REPLAY_WAIT_SECONDS = 30


# presentation -----------------------------------------------------------------

def _iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts else ""


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "–"


def _took(start: float | None, end: float | None) -> str:
    if not start or not end:
        return "–"
    seconds = end - start
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(iso=_iso, when=_when, pretty=_pretty)
    env.globals["took"] = _took
    return env


def _parse_cursor(text: str) -> tuple[float, str]:
    created, _, run_id = text.partition(":")
    try:
        return float(created), run_id
    except ValueError:
        raise Problem(400, f"before: {text!r} is not a cursor (use the 'next' value of the previous page)") from None


def _cursor(run: dict[str, Any]) -> str:
    return f"{run['created_at']!r}:{run['id']}"


def _since(text: str) -> float | None:
    if not text:
        return None
    try:
        return time.time() - parse_duration(text).total_seconds()
    except ValueError as exc:
        raise Problem(400, f"since: {exc}") from None


@dataclass
class Call:
    """One request, as the handlers see it: who made it and the fields it posted."""

    request: Request
    access: Access
    data: dict[str, str] = field(default_factory=dict)

    def param(self, name: str) -> str:
        return self.request.query_params.get(name, "").strip()


class Dashboard:
    """The pages and the API over one ``App``'s store and recipes."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.guard = Guard(app.config.admin.token.get_secret_value())
        self.env = _environment()

    # plumbing -------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        page, api = self._page, self._api
        return [
            Route("/", page(self.runs_page)),
            Route("/runs/{run_id}", page(self.run_page)),
            Route("/runs/{run_id}/replay", page(self.replay_run), methods=["POST"]),
            Route("/deliveries/{delivery_id}", page(self.delivery_page)),
            Route("/deliveries/{delivery_id}/replay", page(self.replay_delivery_page), methods=["POST"]),
            Route("/recipes", page(self.recipes_page)),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", page(self.logout), methods=["POST"]),
            Route("/api/runs", api(self.api_runs)),
            Route("/api/runs/{run_id}", api(self.api_run)),
            Route("/api/deliveries/{delivery_id}", api(self.api_delivery)),
            Route("/api/deliveries/{delivery_id}/replay", api(self.api_replay), methods=["POST"]),
            Route("/api/recipes", api(self.api_recipes)),
            Route("/api/openapi.json", api(self.api_openapi)),
        ]

    def _page(self, handler: Callable[[Call], Response]) -> Callable[[Request], Any]:
        return self._guarded(handler, api=False)

    def _api(self, handler: Callable[[Call], Any]) -> Callable[[Request], Any]:
        return self._guarded(lambda call: _json(handler(call)), api=True)

    def _guarded(self, handler: Callable[[Call], Response], *, api: bool) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            access = None
            try:
                call = Call(request, access := self.guard.check(request))
                if request.method == "POST":
                    call.data = await read_fields(request)
                    self.guard.check_csrf(request, call.access, call.data.get("csrf", "")
                                          or request.headers.get("x-csrf-token", ""))
                return await run_in_threadpool(handler, call)
            except Problem as problem:
                return self._problem(request, problem, api=api, access=access)
        return endpoint

    def _problem(self, request: Request, problem: Problem, *, api: bool, access: Access | None) -> Response:
        if api:
            headers = {"WWW-Authenticate": 'Bearer realm="vivoflow"'} if problem.status == 401 else None
            return JSONResponse({"error": problem.message}, status_code=problem.status, headers=headers)
        if problem.login and request.method == "GET":
            return RedirectResponse("/login?" + urlencode({"next": request.url.path}), status_code=303)
        return self.render("problem.html", access, status=problem.status, problem=problem)

    def render(self, template: str, access: Access | None, *, status: int = 200, **context: Any) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        context = {"access": access, "csrf": access.csrf if access else "", "nonce": nonce, "refresh": None,
                   "notice": None, "nav": None, **context}
        html = self.env.get_template(template).render(context)
        return HTMLResponse(html, status_code=status, headers={
            # No external assets; the one inline script runs by nonce; no framing (the Replay button).
            "Content-Security-Policy": f"default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; "
                                       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
        })

    # queries shared by pages and API -------------------------------------------------

    def _filters(self, call: Call) -> dict[str, Any]:
        status = call.param("status")
        if status and status not in STATUSES:
            raise Problem(400, f"status: {status!r} is not one of {', '.join(STATUSES)}")
        before = call.param("before")
        return {"status": status or None, "recipe": call.param("recipe") or None, "event": call.param("event") or None,
                "since": _since(call.param("since")), "before": _parse_cursor(before) if before else None}

    def _run_page(self, call: Call) -> tuple[list[dict[str, Any]], str | None]:
        try:
            limit = min(max(int(call.param("limit") or PAGE_SIZE), 1), MAX_PAGE_SIZE)
        except ValueError:
            raise Problem(400, "limit: not a number") from None
        rows = self.app.store.page_runs(**self._filters(call), limit=limit + 1)
        return rows[:limit], _cursor(rows[limit - 1]) if len(rows) > limit else None

    def _run(self, run_id: str) -> dict[str, Any]:
        run = self.app.store.get_run(run_id)
        if run is None:
            raise Problem(404, f"no run {run_id!r}")
        run.pop("recipe_source", None)
        run["steps"] = self.app.store.steps_of(run_id)
        return run

    def _delivery(self, delivery_id: str) -> dict[str, Any]:
        delivery = self.app.store.get_delivery(delivery_id)
        if delivery is None:
            raise Problem(404, f"no delivery {delivery_id!r}")
        try:
            delivery["body"] = json.loads(delivery["body"])
        except ValueError:
            pass  # kept as text: the page still shows what arrived
        delivery["runs"] = [{k: v for k, v in r.items() if k != "recipe_source"}
                            for r in self.app.store.runs_of_delivery(delivery_id)]
        delivery["replays"] = self.app.store.replays_of(delivery_id)
        return delivery

    def _recipes(self) -> dict[str, Any]:
        book = self.app.recipes.current()
        folder = Path(self.app.config.recipes.dir)
        last = self.app.store.last_runs(list(book.recipes))

        def short(path: str | Path) -> str:
            path = Path(path)
            return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)

        recipes = [{"name": r.name, "description": r.description, "file": short(r.file), "events": list(r.events),
                    "steps": [{"id": s.id, "use": s.spec.use} for s in r.steps], "last_run": last.get(r.name)}
                   for r in book.recipes.values()]
        errors = [{"file": short(e.file), "line": e.line, "message": e.message,
                   "text": f"{short(e.file)}{f':{e.line}' if e.line else ''}: {e.message}"} for e in book.errors]
        return {"recipes": recipes, "errors": errors}

    def _replay(self, call: Call, delivery_id: str, recipe: str | None) -> str:
        if recipe is not None and recipe not in self.app.recipes.current().recipes:
            raise Problem(400, f"recipe {recipe!r} is not loaded now (see /recipes): a replay would run nothing")
        who = "api (bearer token)" if call.access.via == "bearer" else "dashboard"
        replayer = Replayer(self.app, who=who)
        try:
            return replayer.delivery(delivery_id, recipe=recipe).replay_id
        except VivoflowError as exc:
            raise Problem(404, str(exc)) from None

    # pages ----------------------------------------------------------------------

    def runs_page(self, call: Call) -> Response:
        runs, cursor = self._run_page(call)
        filters = {k: call.param(k) for k in ("recipe", "event", "status", "since") if call.param(k)}
        recipes = sorted({*self.app.recipes.current().recipes, *filter(None, [filters.get("recipe")])})
        deliveries = [] if call.param("before") else self.app.store.page_deliveries(
            event=filters.get("event"), since=_since(filters.get("since", "")), limit=10)
        older = "/?" + urlencode({**filters, "before": cursor}) if cursor else None
        return self.render("runs.html", call.access, nav="runs", runs=runs, deliveries=deliveries, filters=filters,
                           statuses=STATUSES, events=EVENTS, recipes=recipes, older=older,
                           newest=("/?" + urlencode(filters)) if call.param("before") else None)

    def run_page(self, call: Call) -> Response:
        run = self._run(call.request.path_params["run_id"])
        delivery = self._delivery(run["delivery_id"])
        replay = call.param("replay")
        asked = next((r for r in delivery["replays"] if r["id"] == replay), None)
        refresh = _pending(delivery, replay)
        return self.render(
            "run.html", call.access, run=run, delivery=delivery, refresh=1 if refresh else None,
            replayed_by=[r for r in delivery["runs"] if r["replay_of"] == run["id"]],
            notice=None if asked is None else f"Replay {replay} made the run(s) below." if not refresh
            else f"Replay {replay} queued: its run appears below when a worker takes it.",
        )

    def delivery_page(self, call: Call) -> Response:
        delivery = self._delivery(call.request.path_params["delivery_id"])
        replay = call.param("replay")
        return self.render("delivery.html", call.access, delivery=delivery,
                           refresh=1 if _pending(delivery, replay) else None,
                           notice=f"Replay {replay} queued." if replay else None)

    def replay_run(self, call: Call) -> Response:
        run = self._run(call.request.path_params["run_id"])
        recipe = None if run["recipe"] == "(delivery)" else run["recipe"]  # a dead letter: every recipe again
        replay_id = self._replay(call, run["delivery_id"], recipe)
        return RedirectResponse(f"/runs/{run['id']}?" + urlencode({"replay": replay_id}), status_code=303)

    def replay_delivery_page(self, call: Call) -> Response:
        delivery_id = call.request.path_params["delivery_id"]
        replay_id = self._replay(call, delivery_id, None)
        return RedirectResponse(f"/deliveries/{delivery_id}?" + urlencode({"replay": replay_id}), status_code=303)

    def recipes_page(self, call: Call) -> Response:
        return self.render("recipes.html", call.access, nav="recipes", **self._recipes())

    async def login(self, request: Request) -> Response:
        target = request.query_params.get("next", "/")
        target = target if target.startswith("/") and not target.startswith("//") else "/"  # no open redirect
        if not self.guard.token:
            return self.render("login.html", None, target=target, error="admin.token is not set: there is "
                               "nothing to log in with (the dashboard answers loopback clients)", status=404)
        if request.method == "GET":
            return self.render("login.html", None, target=target, error=None)
        fields = await read_fields(request)
        if not self.guard.token_matches(fields.get("token", "")):
            return self.render("login.html", None, target=target, error="wrong token", status=401)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, self.guard.new_session(), max_age=SESSION_SECONDS, path="/",
                            httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    def logout(self, call: Call) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # JSON API ---------------------------------------------------------------------

    def api_runs(self, call: Call) -> dict[str, Any]:
        runs, cursor = self._run_page(call)
        return {"runs": runs, "next": cursor}

    def api_run(self, call: Call) -> dict[str, Any]:
        return self._run(call.request.path_params["run_id"])

    def api_delivery(self, call: Call) -> dict[str, Any]:
        return self._delivery(call.request.path_params["delivery_id"])

    def api_replay(self, call: Call) -> JSONResponse:
        delivery_id = call.request.path_params["delivery_id"]
        replay_id = self._replay(call, delivery_id, call.data.get("recipe") or None)
        return JSONResponse({"replay_id": replay_id, "delivery_id": delivery_id}, status_code=202)

    def api_recipes(self, call: Call) -> dict[str, Any]:
        return self._recipes()

    def api_openapi(self, call: Call) -> dict[str, Any]:
        return openapi(self.app.config.intake.path)


def _pending(delivery: dict[str, Any], replay_id: str) -> bool:
    """Whether a replay asked for moments ago has no run yet, or runs still in progress: the page reloads."""
    asked = next((r for r in delivery["replays"] if r["id"] == replay_id), None)
    if asked is None or time.time() - asked["created_at"] > REPLAY_WAIT_SECONDS:
        return False
    made = [r for r in delivery["runs"] if r["replay_id"] == replay_id]
    return not made or any(r["status"] in ("queued", "running") for r in made)


def _json(value: Any) -> Response:
    return value if isinstance(value, Response) else JSONResponse(json.loads(json.dumps(value, default=str)))


def dashboard_routes(app: App) -> list[BaseRoute]:
    """The dashboard's routes, to follow the intake's own."""
    return Dashboard(app).routes()
