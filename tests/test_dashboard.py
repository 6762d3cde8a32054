"""The dashboard and its JSON API over real HTTP: pages, filters, pagination, replay and who may see them.

A running vivoflow (intake + worker, shipped recipes, a real SMTP server). The real
intake binds 127.0.0.1 only, so requests from other addresses go to the same ASGI
app through ``httpx.ASGITransport(client=...)``, which sets the client address the
app sees (starlette's TestClient can too, but warns that its httpx use is deprecated).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp

from tests.conftest import SHIPPED_RECIPES
from tests.harness import Vivoflow, fixture_body, wait_until
from workers.intake import create_intake

TOKEN = "dashboard-admin-token-0123"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
SUBSCRIBER = "jamie.rivera@example.com"  # the invitee of the invitee.created sample


@pytest.fixture
def secured(make_config: Callable[..., Path], smtp_sink: Any, recipes_dir: Path) -> Iterator[Vivoflow]:
    """Like ``vivoflow``, with ``admin.token`` set."""
    for recipe in SHIPPED_RECIPES.glob("*.yaml"):
        shutil.copy(recipe, recipes_dir / recipe.name)
    with Vivoflow(make_config(smtp_port=smtp_sink.port, admin={"token": TOKEN})) as running:
        yield running


def booking(vivoflow: Vivoflow, n: int = 0) -> str:
    """Post an invitee.created (a distinct booking per ``n``) and wait for both its runs; the delivery id."""
    body = json.loads(fixture_body("invitee.created", created_at=f"2027-02-01T10:00:{n:02d}.000000Z"))
    body["payload"]["uri"] += f"{n:02d}" if n else ""  # another invitee: not a repeat of the same booking
    response = vivoflow.post(json.dumps(body).encode())
    assert response.status_code == 202, response.text
    delivery_id = response.json()["delivery_id"]
    vivoflow.wait_for_runs(delivery_id, count=2)
    return delivery_id


def failed_booking(vivoflow: Vivoflow, smtp_sink: Any, n: int = 0) -> tuple[str, dict[str, Any]]:
    """A booking whose confirmation the mail server refuses: ``(delivery id, the failed run)``."""
    smtp_sink.rcpt_replies[SUBSCRIBER] = "550 5.1.1 no such user"
    delivery_id = booking(vivoflow, n)
    smtp_sink.rcpt_replies.clear()
    runs = {r["recipe"]: r for r in vivoflow.runs(delivery_id)}
    assert runs["booking-confirmation"]["status"] == "failed"
    return delivery_id, runs["booking-confirmation"]


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def from_address(app: ASGIApp, host: str, base_url: str = "http://vivoflow.example") -> Callable[..., httpx.Response]:
    """``request(method, path, **kwargs)`` into ``app`` as a client at ``host``."""
    async def request(method: str, path: str, **kwargs: Any) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=(host, 40123))
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            return await client.request(method, path, **kwargs)

    return lambda method, path, **kwargs: asyncio.run(request(method, path, **kwargs))


def logged_in(vivoflow: Vivoflow) -> httpx.Client:
    client = httpx.Client(base_url=vivoflow.url, timeout=10)
    response = client.post("/login", data={"token": TOKEN})
    assert response.status_code == 303
    return client


# pages --------------------------------------------------------------------------

def test_runs_page_lists_recent_runs_and_deliveries(vivoflow: Vivoflow) -> None:
    delivery_id = booking(vivoflow)
    runs = vivoflow.runs(delivery_id)

    page = vivoflow.http.get(vivoflow.url + "/")

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for run in runs:
        assert f'href="/runs/{run["id"]}"' in page.text
    assert "booking-confirmation" in page.text and "utm-campaign-leads" in page.text
    assert '<span class="badge succeeded">succeeded</span>' in page.text
    assert f'href="/deliveries/{delivery_id}"' in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_status_filter_shows_only_failed_runs(vivoflow: Vivoflow, smtp_sink: Any) -> None:
    delivery_id, failed = failed_booking(vivoflow, smtp_sink)
    succeeded = next(r for r in vivoflow.runs(delivery_id) if r["status"] == "succeeded")

    page = vivoflow.http.get(vivoflow.url + "/", params={"status": "failed"})
    api = vivoflow.http.get(vivoflow.url + "/api/runs", params={"status": "failed"}).json()

    assert failed["id"] in page.text and succeeded["id"] not in page.text
    assert "<option selected>failed</option>" in page.text
    assert [r["id"] for r in api["runs"]] == [failed["id"]]
    by_recipe = vivoflow.http.get(vivoflow.url + "/api/runs", params={"recipe": "utm-campaign-leads"}).json()
    assert [r["id"] for r in by_recipe["runs"]] == [succeeded["id"]]
    assert vivoflow.http.get(vivoflow.url + "/api/runs", params={"event": "invitee.canceled"}).json()["runs"] == []
    assert len(vivoflow.http.get(vivoflow.url + "/api/runs", params={"since": "1h"}).json()["runs"]) == 2
    bad = vivoflow.http.get(vivoflow.url + "/api/runs", params={"since": "yesterday"})
    assert bad.status_code == 400 and "since" in bad.json()["error"]


def test_pagination_cursor_walks_every_run_once(vivoflow: Vivoflow) -> None:
    delivery_id = booking(vivoflow)
    store = vivoflow.store
    for i in range(5):
        store.ensure_run(run_key=f"{delivery_id}:page:{i}", delivery_id=delivery_id, recipe="paged",
                         event="invitee.created", status="succeeded")
    # Two runs in the same instant: the id breaks the tie, so neither is skipped nor shown twice.
    paged = store.page_runs(recipe="paged", limit=2)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE runs SET created_at = ? WHERE id IN (?, ?)",
                             (paged[0]["created_at"], paged[0]["id"], paged[1]["id"]))
    everything = [r["id"] for r in store.page_runs(limit=100)]

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3, **({"before": cursor} if cursor else {})}
        body = vivoflow.http.get(vivoflow.url + "/api/runs", params=params).json()
        seen += [r["id"] for r in body["runs"]]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break

    assert seen == everything and len(seen) == 7 and pages == 3
    first = vivoflow.http.get(vivoflow.url + "/", params={"limit": 3, "recipe": "paged"})
    older = re.search(r'id="older" href="([^"]+)"', first.text)
    assert older and "before=" in older.group(1) and "recipe=paged" in older.group(1)
    second = vivoflow.http.get(vivoflow.url + older.group(1).replace("&amp;", "&") + "&limit=3")
    paged_ids = [r["id"] for r in store.page_runs(recipe="paged", limit=100)]
    assert all(i in second.text for i in paged_ids[3:5]) and paged_ids[0] not in second.text
    assert "← Newest" in second.text


def test_run_page_shows_steps_inputs_error_and_raw_body(vivoflow: Vivoflow, smtp_sink: Any) -> None:
    delivery_id, failed = failed_booking(vivoflow, smtp_sink)

    page = vivoflow.http.get(f"{vivoflow.url}/runs/{failed['id']}").text

    assert 'id="step-confirm"' in page and "email.send" in page
    assert '<span class="badge failed">failed</span>' in page
    assert "no such user" in page  # the step's error, as the mail server said it
    assert f"&#34;to&#34;: &#34;{SUBSCRIBER}&#34;" in page  # rendered inputs, pretty JSON, escaped
    raw_body = page.split('<pre class="raw-body">')[1].split("</pre>")[0]
    assert f"&#34;email&#34;: &#34;{SUBSCRIBER}&#34;" in raw_body and "Rivera Consulting" in raw_body
    assert f'href="/deliveries/{delivery_id}"' in page and 'id="replay"' in page
    delivery = vivoflow.http.get(f"{vivoflow.url}/deliveries/{delivery_id}").text
    assert failed["id"] in delivery and "Rivera Consulting" in delivery
    assert vivoflow.http.get(f"{vivoflow.url}/runs/run_nope").status_code == 404


def test_pages_escape_what_the_webhook_sent(vivoflow: Vivoflow) -> None:
    body = fixture_body("invitee.created")
    body = body.replace(b'"name": "Jamie Rivera"', b'"name": "<script>alert(1)</script>"', 1)
    delivery_id = vivoflow.post(body).json()["delivery_id"]
    run = vivoflow.wait_for_runs(delivery_id, count=2)[0]

    page = vivoflow.http.get(f"{vivoflow.url}/runs/{run['id']}").text

    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page


def test_recipes_page_shows_loaded_recipes_and_a_broken_ones_file_and_line(
    vivoflow: Vivoflow, recipes_dir: Path
) -> None:
    booking(vivoflow)
    (recipes_dir / "broken.yaml").write_text("name: broken\non: invitee.created\nsteps:\n"
                                             "  - id: nope\n    use: fax.send\n    with: {to: x}\n")

    page = wait_until(lambda: (p := vivoflow.http.get(vivoflow.url + "/recipes").text) and "broken.yaml:" in p and p)
    api = vivoflow.http.get(vivoflow.url + "/api/recipes").json()

    assert re.search(r"broken\.yaml:5: .*fax\.send", page)
    assert "booking-confirmation" in page and '<span class="badge succeeded">loaded</span>' in page
    error = next(e for e in api["errors"] if e["file"] == "broken.yaml")
    assert error["line"] == 5 and error["text"].startswith("broken.yaml:5: ")
    recipes = {r["name"]: r for r in api["recipes"]}
    assert set(recipes) == {"booking-confirmation", "cancel-followup", "utm-campaign-leads"}
    assert recipes["booking-confirmation"]["last_run"]["status"] == "succeeded"
    assert recipes["cancel-followup"]["last_run"] is None
    assert recipes["booking-confirmation"]["steps"] == [{"id": "confirm", "use": "email.send"}]


# JSON API -----------------------------------------------------------------------

def test_api_shapes(vivoflow: Vivoflow, smtp_sink: Any) -> None:
    delivery_id, failed = failed_booking(vivoflow, smtp_sink)
    get = lambda path: vivoflow.http.get(vivoflow.url + path)  # noqa: E731

    runs = get("/api/runs").json()
    run = get(f"/api/runs/{failed['id']}").json()
    delivery = get(f"/api/deliveries/{delivery_id}").json()

    assert set(runs) == {"runs", "next"} and runs["next"] is None and len(runs["runs"]) == 2
    assert {"id", "recipe", "event", "status", "created_at", "finished_at", "delivery_id", "replay_of",
            "replay_id"} <= set(runs["runs"][0]) and "recipe_source" not in runs["runs"][0]
    assert run["status"] == "failed" and run["steps"][0]["step_id"] == "confirm"
    assert run["steps"][0]["input"]["to"] == SUBSCRIBER and "no such user" in run["steps"][0]["error"]
    assert delivery["body"]["event"] == "invitee.created" and delivery["body"]["payload"]["email"] == SUBSCRIBER
    assert {r["id"] for r in delivery["runs"]} == {r["id"] for r in runs["runs"]} and delivery["replays"] == []
    assert get("/api/runs/run_nope").status_code == 404
    assert get("/api/deliveries/dlv_nope").json() == {"error": "no delivery 'dlv_nope'"}


def test_openapi_documents_every_route(vivoflow: Vivoflow) -> None:
    document = vivoflow.http.get(vivoflow.url + "/api/openapi.json").json()
    routes = {r.path for r in create_intake(vivoflow.intake_app).routes}

    assert document["openapi"].startswith("3.")
    api_routes = {p for p in routes if p.startswith("/api/")}
    assert api_routes <= set(document["paths"])
    assert {vivoflow.config.intake.path, "/healthz", "/readyz", "/metrics"} <= set(document["paths"])
    assert set(document["paths"]) <= routes
    assert "202" in document["paths"]["/api/deliveries/{delivery_id}/replay"]["post"]["responses"]


def test_replay_via_api_creates_a_new_linked_run(secured: Vivoflow, smtp_sink: Any) -> None:
    delivery_id, failed = failed_booking(secured, smtp_sink)

    response = secured.http.post(f"{secured.url}/api/deliveries/{delivery_id}/replay", headers=BEARER,
                                 json={"recipe": "booking-confirmation"})

    assert response.status_code == 202
    replay_id = response.json()["replay_id"]
    assert response.json() == {"replay_id": replay_id, "delivery_id": delivery_id}
    new = wait_until(lambda: next((r for r in secured.runs(delivery_id)
                                   if r["replay_id"] == replay_id and r["status"] == "succeeded"), None))
    assert new["replay_of"] == failed["id"] and new["recipe"] == "booking-confirmation"
    replays = secured.http.get(f"{secured.url}/api/deliveries/{delivery_id}", headers=BEARER).json()["replays"]
    assert [(r["id"], r["who"]) for r in replays] == [(replay_id, "api (bearer token)")]
    page = secured.http.get(f"{secured.url}/runs/{failed['id']}", headers=BEARER).text
    assert f'href="/runs/{new["id"]}"' in page
    missing = secured.http.post(f"{secured.url}/api/deliveries/dlv_nope/replay", headers=BEARER)
    assert missing.status_code == 404
    unknown = secured.http.post(f"{secured.url}/api/deliveries/{delivery_id}/replay", headers=BEARER,
                                json={"recipe": "no-such-recipe"})
    assert unknown.status_code == 400 and "not loaded" in unknown.json()["error"]


# access -------------------------------------------------------------------------

def test_without_a_token_only_loopback_clients_get_in(vivoflow: Vivoflow) -> None:
    app = create_intake(vivoflow.intake_app)
    outside = from_address(app, "203.0.113.9")

    for path in ("/", "/recipes", "/api/runs", "/api/openapi.json"):
        response = outside("GET", path)
        assert response.status_code == 401, path
        assert "set admin.token" in response.text
    assert outside("GET", "/healthz").status_code == 200  # health and the webhook stay open
    webhook = outside("POST", vivoflow.config.intake.path, content=b"{}")
    assert webhook.status_code == 401 and "admin.token" not in webhook.text  # the signature's own 401
    assert from_address(app, "::1", "http://localhost")("GET", "/api/runs").status_code == 200
    assert vivoflow.http.get(vivoflow.url + "/api/runs").status_code == 200  # real HTTP from 127.0.0.1


def test_without_a_token_a_foreign_host_name_is_refused(vivoflow: Vivoflow) -> None:
    # DNS rebinding: a site whose name resolves to 127.0.0.1 must not read the dashboard.
    response = vivoflow.http.get(vivoflow.url + "/api/runs", headers={"Host": "attacker.example:8000"})

    assert response.status_code == 403 and "admin.token" in response.text


@pytest.mark.parametrize("header", ["X-Forwarded-For", "X-Real-IP", "Forwarded"])
def test_without_a_token_a_request_through_a_proxy_is_refused(vivoflow: Vivoflow, header: str) -> None:
    # A reverse proxy on the same host makes every visitor's peer address 127.0.0.1.
    response = vivoflow.http.get(vivoflow.url + "/api/runs", headers={header: "203.0.113.7"})

    assert response.status_code == 401 and "proxy" in response.json()["error"]
    assert vivoflow.http.get(vivoflow.url + "/api/runs").status_code == 200


def test_without_a_token_a_browser_post_needs_the_csrf_token(vivoflow: Vivoflow) -> None:
    delivery_id = booking(vivoflow)
    run_id = vivoflow.runs(delivery_id)[0]["id"]
    url = f"{vivoflow.url}/runs/{run_id}/replay"
    from_elsewhere = {"Origin": "http://attacker.example", "Sec-Fetch-Site": "cross-site"}

    assert vivoflow.http.post(url, data={}, headers=from_elsewhere).status_code == 403
    assert vivoflow.http.post(f"{vivoflow.url}/api/deliveries/{delivery_id}/replay",
                              headers=from_elsewhere).status_code == 403
    csrf = csrf_of(vivoflow.http.get(f"{vivoflow.url}/runs/{run_id}").text)
    assert vivoflow.http.post(url, data={"csrf": csrf}).status_code == 303
    # curl on the machine itself (no browser headers) may use the API directly.
    assert vivoflow.http.post(f"{vivoflow.url}/api/deliveries/{delivery_id}/replay").status_code == 202


def test_with_a_token_the_bearer_header_decides(secured: Vivoflow) -> None:
    get = lambda path, **kw: secured.http.get(secured.url + path, **kw)  # noqa: E731

    assert get("/api/runs").status_code == 401
    assert get("/api/runs").headers["www-authenticate"].startswith("Bearer")
    assert get("/api/runs", headers={"Authorization": "Bearer not-the-token"}).status_code == 401
    assert get("/", headers={"Authorization": "Bearer not-the-token"}).status_code == 401
    assert get("/api/runs", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert get("/api/runs", headers=BEARER).status_code == 200
    assert get("/", headers=BEARER).status_code == 200
    page = get("/recipes", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2Frecipes"
    outside = from_address(create_intake(secured.intake_app), "203.0.113.9")
    assert outside("GET", "/api/runs", headers=BEARER).status_code == 200
    assert outside("GET", "/api/runs").status_code == 401


def test_login_sets_a_strict_httponly_cookie_that_is_not_the_token(secured: Vivoflow) -> None:
    client = httpx.Client(base_url=secured.url, timeout=10)

    assert "Admin token" in client.get("/login").text
    wrong = client.post("/login", data={"token": "guess"})
    assert wrong.status_code == 401 and "wrong token" in wrong.text and not client.cookies
    response = client.post("/login?next=/recipes", data={"token": TOKEN})

    assert response.status_code == 303 and response.headers["location"] == "/recipes"
    name_value, *attributes = (part.strip() for part in response.headers["set-cookie"].split(";"))
    flags = {a.split("=")[0].lower(): a.partition("=")[2] for a in attributes}
    assert flags["httponly"] == "" and flags["samesite"].lower() == "strict" and flags["path"] == "/"
    assert name_value.startswith("vivoflow_session=") and TOKEN not in name_value
    assert client.get("/recipes").status_code == 200
    assert client.get("/api/runs").status_code == 200
    assert client.post("/login?next=//evil.example", data={"token": TOKEN}).headers["location"] == "/"
    client.cookies.set("vivoflow_session", "1700000000.forged")
    assert client.get("/api/runs").status_code == 401


def test_a_cookie_session_replays_only_with_its_csrf_token(secured: Vivoflow, smtp_sink: Any) -> None:
    delivery_id, failed = failed_booking(secured, smtp_sink)
    client = logged_in(secured)
    replay = f"/runs/{failed['id']}/replay"

    assert client.post(replay, data={}).status_code == 403
    assert client.post(replay, data={"csrf": "0" * 64}).status_code == 403
    assert client.post(f"/api/deliveries/{delivery_id}/replay").status_code == 403
    assert secured.store.replays_of(delivery_id) == []

    csrf = csrf_of(client.get(f"/runs/{failed['id']}").text)
    response = client.post(replay, data={"csrf": csrf})
    assert response.status_code == 303 and response.headers["location"].startswith(f"/runs/{failed['id']}?replay=")
    api = client.post(f"/api/deliveries/{delivery_id}/replay", headers={"X-CSRF-Token": csrf})
    assert api.status_code == 202
    wait_until(lambda: len([r for r in secured.runs(delivery_id) if r["replay_id"]]) >= 2)
    assert {r["who"] for r in secured.store.replays_of(delivery_id)} == {"dashboard"}
