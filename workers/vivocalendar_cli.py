"""The Vivocalendar account commands of ``vivoflow``: ``subscribe``, ``subscriptions`` and ``sso-link``.

They talk to the API with ``connectors.vivocalendar`` settings; workers/cli.py registers them on its group.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import click
import httpx
import jwt
from pydantic import ValidationError

from connectors.vivocalendar import ApiError, VivocalendarApi, VivocalendarConfig
from workers.config import SIGNING_KEY_FILE, Config, validation_message
from workers.errors import ConfigError, VivoflowError
from workers.timezones import ACCOUNT_TIME_ZONES

if TYPE_CHECKING:  # workers.cli imports this module to register the commands
    from workers.cli import Ctx

#: Where ``subscribe`` keeps the signing key it generated, under ``broker.data_dir``.
KEY_FILE = SIGNING_KEY_FILE
INVITEE_EVENTS = ("invitee.created", "invitee.canceled", "invitee_no_show.created", "invitee_no_show.deleted")
#: Events Vivocalendar sends only to organization-scope subscriptions; never subscribed unless asked for.
ORGANIZATION_ONLY_EVENTS = ("routing_form_submission.created",)
SSO_LIFETIME_SECONDS = 15 * 60
DEFAULT_TIME_ZONE = "Pacific Time (US & Canada)"
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


# --- shared ------------------------------------------------------------------------------------


def connector_config(config: Config) -> VivocalendarConfig:
    """``connectors.vivocalendar`` validated the way the workers validate it."""
    try:
        return VivocalendarConfig.model_validate(
            config.connectors.get("vivocalendar") or {}, context={"base_dir": config.base_dir}
        )
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, prefix="connectors.vivocalendar")) from None


@contextlib.contextmanager
def api_session(config: Config) -> Iterator[VivocalendarApi]:
    """The API client for a command; a missing or refused token is a configuration error (exit 2)."""
    settings = connector_config(config)
    if not settings.token.get_secret_value():
        raise ConfigError("connectors.vivocalendar.token is not set: put a Vivocalendar personal access token "
                          "there (the shipped config.yaml reads it from $VIVOCALENDAR_TOKEN)")
    with VivocalendarApi.from_config(settings) as api:
        try:
            yield api
        except ApiError as exc:
            if exc.status == 401:
                raise ConfigError(str(exc)) from None
            raise


# --- subscribe ---------------------------------------------------------------------------------


@click.command()
@click.option("--url", required=True, help="The public URL of this vivoflow's intake (its path is intake.path).")
@click.option("--events", multiple=True, metavar="EVENT[,EVENT…]",
              help="Events to receive, repeatable or comma-separated (default: every invitee event).")
@click.option("--scope", type=click.Choice(["organization", "user"]), default="organization", show_default=True,
              help="organization: every member's bookings (needs an owner or admin token); user: the token's own.")
@click.pass_obj
def subscribe(ctx: Ctx, url: str, events: tuple[str, ...], scope: str) -> None:
    """Create the Vivocalendar webhook subscription that posts to URL, with a new signing key.

    The key is printed once and saved to <broker.data_dir>/vivocalendar-signing-key (mode 600).
    """
    chosen = _chosen_events(events, scope)
    _check_callback_url(url)
    config = ctx.config()
    key_path = Path(config.broker.data_dir) / KEY_FILE
    signing_key = secrets.token_urlsafe(32)
    with api_session(config) as api, _key_file(key_path) as save_key:
        me = api.me()
        try:
            created = api.create_webhook_subscription(
                url=url, events=chosen, organization=me["current_organization"], scope=scope,
                signing_key=signing_key, user=me["uri"] if scope == "user" else None,
            )
        except ApiError as exc:
            raise _subscribe_error(exc, url, scope) from None
        save_key(signing_key)
    click.echo(f"subscribed {created.get('callback_url', url)} to {', '.join(created.get('events', chosen))} "
               f"({scope} scope): {created.get('uri')}")
    click.echo(f"set VIVOCALENDAR_SIGNING_KEY={signing_key} where vivoflow runs (or add it to intake.signing_keys); "
               f"saved in {key_path}")


def _chosen_events(values: tuple[str, ...], scope: str) -> list[str]:
    """``--events`` as given (repeated and/or comma-separated, duplicates dropped), or the default."""
    chosen: list[str] = []
    for name in (part.strip() for value in values for part in value.split(",")):
        if name and name not in chosen:
            chosen.append(name)
    known = (*INVITEE_EVENTS, *ORGANIZATION_ONLY_EVENTS)
    for name in chosen:
        if name == "invitee.rescheduled":
            raise click.BadParameter("invitee.rescheduled is not sent by Vivocalendar: vivoflow derives it "
                                     "from invitee.canceled and invitee.created (subscribe to those)",
                                     param_hint="'--events'")
        if name not in known:
            raise click.BadParameter(f"unknown event {name!r} (choose from {', '.join(known)})",
                                     param_hint="'--events'")
        if name in ORGANIZATION_ONLY_EVENTS and scope != "organization":
            raise click.BadParameter(f"{name} is sent to organization scope only: use --scope organization",
                                     param_hint="'--events'")
    return chosen or list(INVITEE_EVENTS)


def _check_callback_url(url: str) -> None:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise click.BadParameter(f"{url!r} is not an absolute http(s) URL of the intake", param_hint="'--url'")


def _subscribe_error(exc: ApiError, url: str, scope: str) -> VivoflowError:
    """403 and 409 in words that say what to do; Vivocalendar's own message is kept beside them."""
    if exc.status == 403:
        if "upgrade" in exc.remote.lower() or "plan" in exc.remote.lower():
            return VivoflowError(f"webhooks need a paid Vivocalendar plan (Vivocalendar said: {exc.remote})")
        if scope == "organization":
            return VivoflowError("organization scope needs an owner or admin token (try --scope user)")
        return VivoflowError(f"this token may not create webhook subscriptions (Vivocalendar said: {exc.remote})")
    if exc.status == 409:
        return VivoflowError(f"a subscription for {url} already exists: see `vivoflow subscriptions` "
                             "(remove it with --delete URI to create it again)")
    return exc


@contextlib.contextmanager
def _key_file(path: Path) -> Iterator[Callable[[str], None]]:
    """A private temp file beside ``path``, made before the subscription exists: an unwritable data dir
    fails first, and a failed subscription never replaces a key file already in use.

    Yields ``save(key)``, which writes the key and moves the file in place (mode 600 from mkstemp).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise VivoflowError(f"cannot write the signing key in {path.parent}: {exc.strerror or exc}") from None
    file = os.fdopen(fd, "w", encoding="ascii")

    def save(key: str) -> None:
        file.write(key + "\n")
        file.close()
        os.replace(tmp, path)

    try:
        yield save
    finally:
        file.close()
        Path(tmp).unlink(missing_ok=True)


# --- subscriptions -----------------------------------------------------------------------------


@click.command()
@click.option("--delete", "delete", metavar="URI", help="Remove this subscription (its URI as listed, or its UUID).")
@click.pass_obj
def subscriptions(ctx: Ctx, delete: str | None) -> None:
    """List the Vivocalendar webhook subscriptions (organization and user scope), or remove one.

    One line each: callback URL, events, scope, state, URI.
    """
    notes: list[str] = []
    with api_session(ctx.config()) as api:
        if delete:
            try:
                api.delete_webhook_subscription(delete)
            except ApiError as exc:
                if exc.status == 404:
                    raise VivoflowError(f"no subscription {delete} (see `vivoflow subscriptions`)") from None
                raise
            click.echo(f"deleted {delete}")
            return
        me = api.me()
        organization = me["current_organization"]
        found: list[dict[str, Any]] = []
        try:
            found += api.list_webhook_subscriptions(organization, "organization")
        except ApiError as exc:
            if exc.status != 403:
                raise
            notes.append("organization-scope subscriptions not listed: the token is not an owner or admin")
        found += api.list_webhook_subscriptions(organization, "user", user=me["uri"])
    for sub in found:
        fields = (sub.get("callback_url"), ",".join(sub.get("events") or []), sub.get("scope"), sub.get("state"),
                  sub.get("uri"))
        click.echo("  ".join(str(field) for field in fields))
    if not found:
        click.echo("no webhook subscriptions (create one with `vivoflow subscribe --url URL`)")
    if any(sub.get("state") == "disabled" for sub in found):
        notes.append("a disabled subscription gets no deliveries: delete it and subscribe again")
    for note in notes:
        click.echo(note, err=True)


# --- sso-link ----------------------------------------------------------------------------------


@click.command("sso-link")
@click.argument("kind", type=click.Choice(["signup", "login"]))
@click.option("--email", required=True, help="The user's email address.")
@click.option("--name", help="signup: the user's full name.")
@click.option("--business", help="signup: the business (account) name.")
@click.option("--time-zone", "time_zone", metavar="NAME",
              help=f"signup: an account time zone name (default: {DEFAULT_TIME_ZONE}).")
@click.option("--logout-redirect-url", metavar="URL", help="login: where the user lands after logging out.")
@click.pass_obj
def sso_link(ctx: Ctx, kind: str, email: str, name: str | None, business: str | None, time_zone: str | None,
             logout_redirect_url: str | None) -> None:
    """Print a white-label SSO URL for signup or login, valid 15 minutes.

    The token is a JWT (HS256) signed with connectors.vivocalendar.sso_private_key.
    """
    if not _EMAIL.match(email):
        raise click.BadParameter(f"{email!r} is not an email address", param_hint="'--email'")
    if kind == "signup":
        if logout_redirect_url:
            raise click.UsageError("--logout-redirect-url is for login links")
        if not name or not business:
            raise click.UsageError("a signup link needs --name and --business")
        claims: dict[str, Any] = {
            "business_name": business, "email": email, "name": name,
            "time_zone": account_time_zone(time_zone or DEFAULT_TIME_ZONE),
        }
    else:
        if name or business or time_zone:
            raise click.UsageError("--name, --business and --time-zone are for signup links")
        claims = {"email": email}
        if logout_redirect_url:
            claims["logout_redirect_url"] = logout_redirect_url
    settings = connector_config(ctx.config())
    key = settings.sso_private_key.get_secret_value()
    if not key:
        raise ConfigError("connectors.vivocalendar.sso_private_key is not set: put the SSO private key "
                          "Vivocalendar gave you there (the shipped config.yaml reads $VIVOCALENDAR_SSO_KEY)")
    if not settings.sso_issuer:
        raise ConfigError("connectors.vivocalendar.sso_issuer is not set: put the issuer name Vivocalendar "
                          "registered for your SSO integration there")
    now = int(time.time())
    claims.update(iss=settings.sso_issuer, iat=now, exp=now + SSO_LIFETIME_SECONDS)
    with warnings.catch_warnings():
        # PyJWT warns about HMAC keys under 32 bytes; the key is issued by Vivocalendar, not chosen
        # here, and a warning would break the one-line output.
        warnings.filterwarnings("ignore", message="The HMAC key is")
        token = jwt.encode(claims, key, algorithm="HS256")
    click.echo(f"{settings.app_url.rstrip('/')}/sso/{kind}?{urlencode({'token': token})}")


def account_time_zone(value: str) -> str:
    """The account time zone name as Vivocalendar spells it (case aside); anything else is a usage error.

    An IANA name gets the account name to use instead, when there is one.
    """
    wanted = value.strip()
    for zone in ACCOUNT_TIME_ZONES:
        if zone.casefold() == wanted.casefold():
            return zone
    candidates = [zone for zone, iana in ACCOUNT_TIME_ZONES.items() if iana == wanted]
    city = wanted.rsplit("/", 1)[-1].replace("_", " ")
    suggestion = next((z for z in candidates if z == city), candidates[0] if candidates else None)
    hint = f"; for {wanted} use {suggestion!r}" if suggestion else ""
    raise click.BadParameter(
        f"{value!r} is not a Vivocalendar account time zone name{hint} (examples: 'Pacific Time (US & Canada)', "
        "'Eastern Time (US & Canada)', 'London', 'Berlin', 'Tokyo', 'UTC')",
        param_hint="'--time-zone'",
    )
