"""``vivoflow subscribe``, ``subscriptions`` and ``sso-link`` against a fake Vivocalendar API over real HTTP.

Run through ``workers.cli.main`` (one error line and the exit code, as a user sees them) with the
commands added to the real ``vivoflow`` group.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import yaml

import workers.cli
from tests.fake_vivocalendar import TOKEN, FakeVivocalendar
from workers.vivocalendar_cli import INVITEE_EVENTS, KEY_FILE

SSO_KEY = "partner-sso-private-key-0123456789abcdef"
HOOK = "https://flows.example.com/webhooks/vivocalendar"


@pytest.fixture
def fake() -> Iterator[FakeVivocalendar]:
    with FakeVivocalendar() as running:
        yield running


def write_config(folder: Path, **vivocalendar: Any) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"broker": {"data_dir": "data"}, "connectors": {"vivocalendar": vivocalendar}}))
    return path


@pytest.fixture
def config(tmp_path: Path, fake: FakeVivocalendar) -> Path:
    return write_config(tmp_path, base_url=fake.url, token=TOKEN, app_url="https://app.example.com",
                        sso_issuer="acme-partner", sso_private_key=SSO_KEY)


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def error_line(self, code: int) -> str:
        """The one line on stderr of a failed command."""
        assert self.code == code, (self.out, self.err)
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, self.err
        assert "Traceback" not in self.err
        return lines[0]


@pytest.fixture
def vivoflow(config: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    def run(*args: str, config_path: Path = config) -> Result:
        try:
            workers.cli.main(["--config", str(config_path), *args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


# --- subscribe -----------------------------------------------------------------------------


def test_subscribe_creates_the_subscription_and_keeps_its_key_private(
    vivoflow: Any, fake: FakeVivocalendar, tmp_path: Path
) -> None:
    result = vivoflow("subscribe", "--url", HOOK)

    assert result.code == 0, result.err
    assert result.err == ""
    [post] = fake.received("POST", "/webhook_subscriptions")
    body = post.json
    key = body.pop("signing_key")
    assert body == {"url": HOOK, "events": list(INVITEE_EVENTS), "organization": fake.organization,
                    "scope": "organization"}
    assert len(key) >= 43
    key_file = tmp_path / "data" / KEY_FILE
    assert key_file.read_text() == key + "\n"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert result.out.count(key) == 1
    assert f"VIVOCALENDAR_SIGNING_KEY={key}" in result.out
    [created] = fake.subscriptions.values()
    assert result.out.splitlines()[0] == (
        f"subscribed {HOOK} to {', '.join(INVITEE_EVENTS)} (organization scope): {created['uri']}"
    )
    assert fake.signing_keys[created["uri"]] == key
    assert [p.name for p in key_file.parent.iterdir()] == [KEY_FILE]


def test_each_subscription_gets_a_new_key(vivoflow: Any, fake: FakeVivocalendar) -> None:
    vivoflow("subscribe", "--url", HOOK)
    vivoflow("subscribe", "--url", HOOK + "-staging")

    first, second = fake.signing_keys.values()
    assert first != second


def test_subscribe_with_user_scope_names_the_user(vivoflow: Any, fake: FakeVivocalendar) -> None:
    result = vivoflow("subscribe", "--url", HOOK, "--scope", "user")

    assert result.code == 0, result.err
    body = fake.received("POST", "/webhook_subscriptions")[0].json
    assert (body["scope"], body["user"], body["organization"]) == ("user", fake.user["uri"], fake.organization)


def test_events_are_repeatable_and_comma_separated(vivoflow: Any, fake: FakeVivocalendar) -> None:
    result = vivoflow("subscribe", "--url", HOOK, "--events", "invitee.created, invitee.canceled",
                      "--events", "routing_form_submission.created", "--events", "invitee.created")

    assert result.code == 0, result.err
    assert fake.received("POST", "/webhook_subscriptions")[0].json["events"] == [
        "invitee.created", "invitee.canceled", "routing_form_submission.created",
    ]


@pytest.mark.parametrize(("events", "scope", "says"), [
    ("routing_form_submission.created", "user", "organization scope only"),
    ("invitee.rescheduled", "organization", "derives it from invitee.canceled and invitee.created"),
    ("invitee.teleported", "organization", "unknown event 'invitee.teleported'"),
])
def test_an_event_that_cannot_be_subscribed_is_a_usage_error(
    vivoflow: Any, fake: FakeVivocalendar, events: str, scope: str, says: str
) -> None:
    result = vivoflow("subscribe", "--url", HOOK, "--events", events, "--scope", scope)

    assert says in result.error_line(2)
    assert fake.received() == []


def test_a_callback_that_is_not_a_url_is_a_usage_error(vivoflow: Any, fake: FakeVivocalendar) -> None:
    assert "not an absolute http(s) URL" in vivoflow("subscribe", "--url", "flows.example.com").error_line(2)
    assert fake.received() == []


def test_organization_scope_refused_says_an_owner_or_admin_token_is_needed(
    vivoflow: Any, fake: FakeVivocalendar, tmp_path: Path
) -> None:
    fake.forbid_organization_scope = True

    result = vivoflow("subscribe", "--url", HOOK)

    assert result.error_line(1) == (
        "vivoflow: organization scope needs an owner or admin token (try --scope user)"
    )
    assert result.out == ""
    assert list((tmp_path / "data").iterdir()) == []


def test_an_account_without_webhooks_is_told_it_needs_a_paid_plan(vivoflow: Any, fake: FakeVivocalendar) -> None:
    fake.paid_plan = False

    result = vivoflow("subscribe", "--url", HOOK, "--scope", "user")

    assert result.error_line(1) == ("vivoflow: webhooks need a paid Vivocalendar plan "
                                    "(Vivocalendar said: Please upgrade your Vivocalendar account to Standard)")


def test_a_url_already_subscribed_points_to_subscriptions_and_keeps_the_saved_key(
    vivoflow: Any, fake: FakeVivocalendar, tmp_path: Path
) -> None:
    assert vivoflow("subscribe", "--url", HOOK).code == 0
    key_file = tmp_path / "data" / KEY_FILE
    saved = key_file.read_text()

    result = vivoflow("subscribe", "--url", HOOK)

    line = result.error_line(1)
    assert line.startswith(f"vivoflow: a subscription for {HOOK} already exists: see `vivoflow subscriptions`")
    assert key_file.read_text() == saved
    assert [p.name for p in key_file.parent.iterdir()] == [KEY_FILE]


def test_subscribe_without_a_token_is_a_config_error(vivoflow: Any, fake: FakeVivocalendar, tmp_path: Path) -> None:
    result = vivoflow("subscribe", "--url", HOOK, config_path=write_config(tmp_path, base_url=fake.url))

    assert "connectors.vivocalendar.token is not set" in result.error_line(2)
    assert fake.received() == []


def test_a_refused_token_is_a_config_error_that_does_not_print_it(
    vivoflow: Any, fake: FakeVivocalendar, tmp_path: Path
) -> None:
    result = vivoflow("subscribe", "--url", HOOK,
                      config_path=write_config(tmp_path, base_url=fake.url, token="stale-token-123"))

    line = result.error_line(2)
    assert line == ("vivoflow: Vivocalendar answered 401: The access token is invalid "
                    "(check connectors.vivocalendar.token)")
    assert "stale-token-123" not in result.out + result.err


def test_a_rate_limited_api_is_one_line(vivoflow: Any, fake: FakeVivocalendar) -> None:
    fake.rate_limit()
    line = vivoflow("subscribe", "--url", HOOK).error_line(1)

    assert line == "vivoflow: Vivocalendar answered 429: Rate limit exceeded"


# --- subscriptions -------------------------------------------------------------------------


def test_subscriptions_lists_organization_and_user_scope(vivoflow: Any, fake: FakeVivocalendar) -> None:
    org = fake.add_subscription(HOOK, ["invitee.created", "invitee.canceled"])
    mine = fake.add_subscription("https://me.example.com/hook", ["invitee.created"], "user", state="disabled")

    result = vivoflow("subscriptions")

    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        f"{HOOK}  invitee.created,invitee.canceled  organization  active  {org['uri']}",
        f"https://me.example.com/hook  invitee.created  user  disabled  {mine['uri']}",
    ]
    assert result.err.strip() == "a disabled subscription gets no deliveries: delete it and subscribe again"


def test_subscriptions_says_when_there_are_none(vivoflow: Any) -> None:
    result = vivoflow("subscriptions")

    assert result.out.strip() == "no webhook subscriptions (create one with `vivoflow subscribe --url URL`)"


def test_without_admin_rights_the_user_scope_is_listed_with_a_note(vivoflow: Any, fake: FakeVivocalendar) -> None:
    fake.add_subscription(HOOK, ["invitee.created"])
    mine = fake.add_subscription("https://me.example.com/hook", ["invitee.created"], "user")
    fake.forbid_organization_scope = True

    result = vivoflow("subscriptions")

    assert result.code == 0
    assert result.out.splitlines() == [f"https://me.example.com/hook  invitee.created  user  active  {mine['uri']}"]
    assert "not an owner or admin" in result.err


def test_subscriptions_delete_removes_one_by_uri_or_uuid(vivoflow: Any, fake: FakeVivocalendar) -> None:
    first = fake.add_subscription(HOOK, ["invitee.created"])
    second = fake.add_subscription(HOOK + "-2", ["invitee.created"])

    assert vivoflow("subscriptions", "--delete", first["uri"]).out.strip() == f"deleted {first['uri']}"
    uuid = second["uri"].rsplit("/", 1)[1]
    assert vivoflow("subscriptions", "--delete", uuid).code == 0

    assert fake.subscriptions == {}
    assert [r.method for r in fake.received(path=f"/webhook_subscriptions/{uuid}")] == ["DELETE"]


def test_deleting_an_unknown_subscription_is_one_line(vivoflow: Any, fake: FakeVivocalendar) -> None:
    uri = fake.uri("/webhook_subscriptions/NOPE")

    assert vivoflow("subscriptions", "--delete", uri).error_line(1) == (
        f"vivoflow: no subscription {uri} (see `vivoflow subscriptions`)"
    )


def test_delete_never_sends_the_token_to_another_host(vivoflow: Any, fake: FakeVivocalendar) -> None:
    line = vivoflow("subscriptions", "--delete", "https://evil.example.com/webhook_subscriptions/X").error_line(1)

    assert "is not a Vivocalendar API URI" in line
    assert fake.received() == []


# --- sso-link ------------------------------------------------------------------------------


def claims_of(result: Any, kind: str) -> dict[str, Any]:
    assert result.code == 0, result.err
    [line] = result.out.splitlines()
    url = urlsplit(line)
    assert f"{url.scheme}://{url.netloc}{url.path}" == f"https://app.example.com/sso/{kind}"
    [token] = parse_qs(url.query)["token"]
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    return jwt.decode(token, SSO_KEY, algorithms=["HS256"], issuer="acme-partner")


def test_sso_signup_link_carries_a_15_minute_jwt_with_the_signup_claims(vivoflow: Any) -> None:
    result = vivoflow("sso-link", "signup", "--email", "pat@acme.example", "--name", "Pat Doe",
                      "--business", "Acme & Co", "--time-zone", "Eastern Time (US & Canada)")

    claims = claims_of(result, "signup")
    assert set(claims) == {"iss", "exp", "iat", "business_name", "email", "name", "time_zone"}
    assert (claims["email"], claims["name"], claims["business_name"], claims["time_zone"]) == (
        "pat@acme.example", "Pat Doe", "Acme & Co", "Eastern Time (US & Canada)")
    assert claims["exp"] - claims["iat"] == 900
    assert result.err == ""


def test_sso_signup_time_zone_defaults_to_pacific_and_ignores_case(vivoflow: Any) -> None:
    base = ("sso-link", "signup", "--email", "pat@acme.example", "--name", "Pat", "--business", "Acme")

    assert claims_of(vivoflow(*base), "signup")["time_zone"] == "Pacific Time (US & Canada)"
    assert claims_of(vivoflow(*base, "--time-zone", " berlin "), "signup")["time_zone"] == "Berlin"


@pytest.mark.parametrize(("zone", "says"), [
    ("America/New_York", "for America/New_York use 'Eastern Time (US & Canada)'"),
    ("Europe/London", "for Europe/London use 'London'"),
    ("Mars/Olympus", "'Mars/Olympus' is not a Vivocalendar account time zone name (examples:"),
])
def test_sso_signup_refuses_a_time_zone_that_is_not_an_account_name(vivoflow: Any, zone: str, says: str) -> None:
    result = vivoflow("sso-link", "signup", "--email", "pat@acme.example", "--name", "Pat", "--business", "Acme",
                      "--time-zone", zone)

    assert says in result.error_line(2)
    assert result.out == ""


def test_sso_login_link_carries_the_login_claims(vivoflow: Any) -> None:
    with_redirect = vivoflow("sso-link", "login", "--email", "pat@acme.example",
                             "--logout-redirect-url", "https://acme.example/bye")
    without = vivoflow("sso-link", "login", "--email", "pat@acme.example")

    claims = claims_of(with_redirect, "login")
    assert set(claims) == {"email", "iss", "logout_redirect_url", "exp", "iat"}
    assert claims["logout_redirect_url"] == "https://acme.example/bye"
    assert claims["exp"] - claims["iat"] == 900
    assert set(claims_of(without, "login")) == {"email", "iss", "exp", "iat"}


def test_a_link_signed_with_another_key_does_not_verify(vivoflow: Any) -> None:
    token = parse_qs(urlsplit(vivoflow("sso-link", "login", "--email", "pat@acme.example").out.strip()).query)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token["token"][0], "another-key-of-at-least-32-bytes!!", algorithms=["HS256"])


@pytest.mark.parametrize(("args", "says"), [
    (("signup", "--email", "pat@acme.example"), "a signup link needs --name and --business"),
    (("login", "--email", "pat@acme.example", "--name", "Pat"), "are for signup links"),
    (("signup", "--email", "pat@acme.example", "--name", "P", "--business", "B", "--logout-redirect-url", "x"),
     "--logout-redirect-url is for login links"),
    (("login", "--email", "not-an-address"), "'not-an-address' is not an email address"),
    (("logout", "--email", "pat@acme.example"), "'logout' is not one of 'signup', 'login'"),
])
def test_sso_link_usage_mistakes_are_one_line_and_exit_2(vivoflow: Any, args: tuple[str, ...], says: str) -> None:
    assert says in vivoflow("sso-link", *args).error_line(2)


@pytest.mark.parametrize(("settings", "key"), [
    ({"sso_issuer": "acme-partner"}, "sso_private_key"),
    ({"sso_private_key": SSO_KEY}, "sso_issuer"),
])
def test_sso_link_without_its_settings_names_the_missing_key(
    vivoflow: Any, tmp_path: Path, settings: dict[str, str], key: str
) -> None:
    result = vivoflow("sso-link", "login", "--email", "pat@acme.example",
                      config_path=write_config(tmp_path, **settings))

    assert f"connectors.vivocalendar.{key} is not set" in result.error_line(2)


def test_a_short_partner_key_still_prints_only_the_link(vivoflow: Any, tmp_path: Path) -> None:
    result = vivoflow("sso-link", "login", "--email", "pat@acme.example",
                      config_path=write_config(tmp_path, sso_issuer="acme", sso_private_key="short"))

    assert result.code == 0
    assert result.err == ""
    assert len(result.out.splitlines()) == 1


def test_a_bad_vivocalendar_section_is_a_config_error_naming_the_key(vivoflow: Any, tmp_path: Path) -> None:
    result = vivoflow("subscriptions", config_path=write_config(tmp_path, tokn="x"))

    assert result.error_line(2) == "vivoflow: connectors.vivocalendar.tokn: unknown key"
