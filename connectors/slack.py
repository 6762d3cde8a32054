"""The ``slack`` connector: ``slack.post_message`` through the Web API or an incoming webhook.

The Web API (``token``) answers in JSON with ``ok`` and an error code; a webhook answers in plain text.
"""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr, field_validator, model_validator

from connectors import httpcalls
from connectors.base import ActionCall, ActionInput, Connector, ConnectorConfig, RenderAs, SlackText, action
from workers.errors import PermanentStepError, RetryableStepError, StepError

SERVICE = "Slack"
#: Never the URL itself: it embeds the secret that lets anyone post to the channel.
WEBHOOK_SERVICE = "Slack incoming webhook"

#: ``ok: false`` codes that a later attempt may not get; any other code is permanent.
RETRYABLE_ERRORS = frozenset({
    "ratelimited", "rate_limited", "service_unavailable", "internal_error", "fatal_error", "request_timeout",
})

#: What to do about the failures a user can fix, by Slack's error code (Web API and webhooks).
HINTS = {
    "invalid_auth": "check connectors.slack.token",
    "not_authed": "set connectors.slack.token",
    "account_inactive": "the token's user or app is deactivated: set a new connectors.slack.token",
    "token_revoked": "the token was revoked: set a new connectors.slack.token",
    "token_expired": "the token expired: set a new connectors.slack.token",
    "missing_scope": "the token needs the chat:write scope",
    "channel_not_found": "check the channel name or ID; a private channel needs the bot invited",
    "not_in_channel": "invite the bot to the channel (/invite @your-app)",
    "is_archived": "the channel is archived",
    "channel_is_archived": "the webhook's channel is archived",
    "msg_too_long": "the text is too long for Slack: shorten it",
    "no_text": "give text or blocks",
    "invalid_blocks": "the blocks are not valid Block Kit",
    "invalid_blocks_format": "blocks must be a list of Block Kit objects",
    "invalid_payload": "the message is not valid for Slack (check text and blocks)",
    "no_service": "the webhook was removed or disabled: set a new connectors.slack.webhook_url",
    "no_active_hooks": "the webhook was removed or disabled: set a new connectors.slack.webhook_url",
}


class SlackConfig(ConnectorConfig):
    """``connectors.slack``: ``token`` (a bot token, used first) or ``webhook_url`` (an incoming webhook)."""

    base_url: str = "https://slack.com/api"
    token: SecretStr = SecretStr("")
    webhook_url: SecretStr = SecretStr("")
    timeout_seconds: float = 10

    @field_validator("base_url", "webhook_url")
    @classmethod
    def _http_url(cls, value: str | SecretStr) -> str | SecretStr:
        # Checked at start-up: a typo would fail every step, and a webhook URL without a scheme would be
        # read as a path under base_url. The message never quotes the value (the webhook URL is a secret).
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text and not text.startswith(("https://", "http://")):
            raise ValueError("must start with https:// (or http:// for a local test server)")
        return value


#: Event values in blocks are escaped too: a mrkdwn section would otherwise read ``<!channel>`` as a ping.
SlackBlocks = Annotated[list[dict[str, Any]], RenderAs.SLACK]


class PostMessageInput(ActionInput):
    """Inputs of ``slack.post_message``; ``channel`` is needed with the Web API, a webhook has its own."""

    channel: str | None = None
    text: SlackText | None = None
    blocks: SlackBlocks | None = None
    thread_ts: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> PostMessageInput:
        if not self.text and not self.blocks:
            raise ValueError("slack.post_message needs text or blocks (or both)")
        return self

    def payload(self, *fields: str) -> dict[str, Any]:
        """The named fields that are set, as Slack's JSON body (Slack reads ``null`` as a value)."""
        values = {name: getattr(self, name) for name in fields}
        return {name: value for name, value in values.items() if value is not None}


class SlackConnector(Connector):
    """Posts one message per step; the Web API when a token is set, else the incoming webhook.

    Slack has no idempotency key for messages: a retry after a timeout may post twice.
    """

    name = "slack"
    config_model = SlackConfig

    config: SlackConfig

    def __init__(self, config: SlackConfig) -> None:
        super().__init__(config)
        # Built here, not on first use: worker threads share the instance, and one pool serves both modes.
        self.client = httpcalls.make_client(config.base_url, timeout=config.timeout_seconds)

    def close(self) -> None:
        self.client.close()

    @action("post_message", input=PostMessageInput)
    def post_message(self, inputs: PostMessageInput, call: ActionCall) -> dict[str, Any]:
        """Post a message (text, Block Kit blocks or both) to a channel, optionally in a thread."""
        token = self.config.token.get_secret_value()
        webhook_url = self.config.webhook_url.get_secret_value()
        try:
            if token:
                output = self._post_web_api(token, inputs)
            elif webhook_url:
                output = self._post_webhook(webhook_url, inputs)
            else:
                raise self.not_configured("token", "webhook_url")
        except StepError as exc:
            raise self._scrubbed(exc) from None
        self.log.info("slack: message posted to %s (ts %s)", output.get("channel") or "the webhook's channel",
                      output["ts"])
        return output

    def _post_web_api(self, token: str, inputs: PostMessageInput) -> dict[str, Any]:
        """``chat.postMessage``: HTTP errors first, then Slack's own ``ok: false`` answer."""
        if not inputs.channel:
            raise PermanentStepError("slack.post_message needs a channel (an ID like C0123 or #name) with a token")
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json; charset=utf-8"}
        body = json.dumps(inputs.payload("channel", "text", "blocks", "thread_ts"))
        response = httpcalls.send(lambda: self.client.post("chat.postMessage", content=body, headers=headers),
                                  SERVICE)
        httpcalls.raise_for_status(response, SERVICE)
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or "ok" not in data:
            raise PermanentStepError(
                f"{SERVICE} answered {response.status_code} without its JSON: check connectors.slack.base_url"
            )
        if not data["ok"]:
            raise _api_error(data, response)
        return {"ts": data.get("ts"), "channel": data.get("channel")}

    def _post_webhook(self, url: str, inputs: PostMessageInput) -> dict[str, Any]:
        """An incoming webhook posts to the channel chosen when it was created, and returns no ``ts``."""
        body = json.dumps(inputs.payload("text", "blocks", "thread_ts"))
        headers = {"Content-Type": "application/json; charset=utf-8"}
        response = httpcalls.send(lambda: self.client.post(url, content=body, headers=headers), WEBHOOK_SERVICE)
        try:
            httpcalls.raise_for_status(response, WEBHOOK_SERVICE)
        except StepError as exc:
            hint = HINTS.get(response.text.strip())
            if hint:
                raise type(exc)(f"{exc.message} ({hint})", retry_after=exc.retry_after) from None
            raise
        return {"ts": None}

    def _scrubbed(self, exc: StepError) -> StepError:
        """The error with the token and webhook URL blanked, in case a message or server quoted them.

        The URL's path alone is blanked too: it holds the secret, and servers echo it ("Cannot POST /services/…").
        """
        url = self.config.webhook_url.get_secret_value()
        secrets = [url, urlsplit(url).path, self.config.token.get_secret_value()]
        message = exc.message
        for secret in secrets:
            if len(secret) > 1:  # not "" or a bare "/"
                message = message.replace(secret, "***")
        if message == exc.message:
            return exc
        return type(exc)(message, retry_after=exc.retry_after)


def _api_error(data: dict[str, Any], response: httpx.Response) -> StepError:
    """The step error for an ``ok: false`` answer: its code, the hint, and whether to retry."""
    code = str(data.get("error") or "unknown_error")
    message = f"{SERVICE} chat.postMessage failed: {code}"
    needed = data.get("needed")  # missing_scope names the scope the token lacks
    hint = f"the token needs the {needed} scope" if code == "missing_scope" and needed else HINTS.get(code)
    if hint:
        message += f" ({hint})"
    if code in RETRYABLE_ERRORS:
        return RetryableStepError(message, retry_after=httpcalls.retry_after(response))
    return PermanentStepError(message)
