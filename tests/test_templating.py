"""Rendering: event values escaped for where they land, strict about typos, sandboxed.

Also the template context built from every shipped sample webhook (SPEC §5).
"""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from markupsafe import Markup

from connectors.base import ConnectorRegistry, RenderAs
from tests.harness import FIXTURES
from workers.events import Envelope, build_context
from workers.recipes import Step, load_recipe
from workers.samples import sample_names
from workers.sandbox import limited
from workers.templating import TOP_NAMES, Templates, _Bound, _Direct, _direct_parts

HOSTILE_NAME = "<script>alert(1)</script>\r\nBcc: victim@example.com"


def sample(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def context_of(body: dict[str, Any] | str) -> dict[str, Any]:
    raw = (FIXTURES / f"{body}.json").read_text() if isinstance(body, str) else json.dumps(body)
    return build_context(Envelope.model_validate_json(raw))


def compiled_step(tmp_path: Path, with_block: str, use: str = "email.send") -> Step:
    """The one step of a recipe written to disk and loaded like any other."""
    registry = ConnectorRegistry.discover()
    registry.configure({}, base_dir=tmp_path)
    path = tmp_path / "escaping.yaml"
    path.write_text(f"on: invitee.created\nsteps:\n  - id: s\n    use: {use}\n    with:\n"
                    + textwrap.indent(textwrap.dedent(with_block), "      "))
    recipe, errors = load_recipe(path, registry, Templates())
    assert errors == [] and recipe is not None, [str(e) for e in errors]
    return recipe.steps[0]


def hostile_booking() -> dict[str, Any]:
    body = sample("invitee.created")
    body["payload"].update(name=HOSTILE_NAME, first_name="<b>Jamie</b> & co")
    return body


def test_html_input_escapes_event_values_and_keeps_the_recipes_markup(tmp_path: Path) -> None:
    step = compiled_step(tmp_path, """\
        to: "{{ invitee.email }}"
        subject: Booked
        html: '<p class="hi">Hi {{ invitee.first_name }}</p><a href="{{ invitee.cancel_url }}">Cancel</a>'
        text: "Hi {{ invitee.first_name }}"
        """)

    inputs = step.inputs(context_of(hostile_booking()))

    assert inputs["html"] == ('<p class="hi">Hi &lt;b&gt;Jamie&lt;/b&gt; &amp; co</p>'
                              '<a href="https://vivocalendar.com/cancellations/AAAAAAAAAAAAAAA4">Cancel</a>')
    # Plain text is not HTML: it keeps the value as the invitee typed it.
    assert inputs["text"] == "Hi <b>Jamie</b> & co"


def test_header_input_turns_line_breaks_from_the_event_into_spaces(tmp_path: Path) -> None:
    step = compiled_step(tmp_path, """\
        to: "{{ invitee.email }}"
        subject: "Booked: {{ invitee.name }}"
        text: hi
        """)

    inputs = step.inputs(context_of(hostile_booking()))

    assert inputs["subject"] == "Booked: <script>alert(1)</script> Bcc: victim@example.com"
    validated = step.action.input_model.model_validate(inputs)
    assert "\n" not in validated.subject and "\r" not in validated.subject  # type: ignore[attr-defined]


@pytest.mark.parametrize("breaker", ["\n", "\r", "\r\n", "\u2028", "\x0b", "\x85"])
def test_header_kind_folds_every_line_break(breaker: str) -> None:
    render = Templates().compile("Re: {{ v }}", RenderAs.HEADER)

    assert render({"v": f"a{breaker}X-Injected: 1"}) == "Re: a X-Injected: 1"


def test_slack_kind_escapes_event_values_and_keeps_the_authors_mentions() -> None:
    render = Templates().compile("<!here> {{ name }} canceled (<https://x.example|{{ reason }}>)", RenderAs.SLACK)

    text = render({"name": "<!channel> & friends", "reason": "a > b"})

    assert text == "<!here> &lt;!channel&gt; &amp; friends canceled (<https://x.example|a &gt; b>)"


def test_slack_kind_keeps_a_value_the_author_marked_safe() -> None:
    render = Templates().compile("{{ mention | safe }} {{ name }}", RenderAs.SLACK)

    assert render({"mention": "<@U123>", "name": "<@U999>"}) == "<@U123> &lt;@U999&gt;"


def test_html_kind_escapes_a_value_once_not_twice() -> None:
    render = Templates().compile("<p>{{ v }}</p>", RenderAs.HTML)

    assert render({"v": "Tom & Jerry <3"}) == "<p>Tom &amp; Jerry &lt;3</p>"


@pytest.mark.parametrize("kind", list(RenderAs))
def test_none_renders_as_an_empty_string_in_every_kind(kind: RenderAs) -> None:
    render = Templates().compile("[{{ value }}]", kind)

    assert render({"value": None}) == "[]"


def test_documented_names_missing_from_the_event_are_none_not_errors(tmp_path: Path) -> None:
    step = compiled_step(tmp_path, """\
        message: "[{{ reason }}|{{ canceled_by }}|{{ canceler_type }}|{{ submission.result }}|{{ old }}]"
        """, use="log.write")

    assert step.inputs(context_of("invitee.created")) == {"message": "[||||]"}
    no_show = Templates().compile("{{ invitee.email }}|{{ meeting.start_time }}|{{ utm.source }}")
    assert no_show(context_of("invitee_no_show.created")) == "||"


def test_a_field_typo_fails_at_render_when_validation_cannot_see_it() -> None:
    templates = Templates()
    source = "{% set who = invitee %}{{ who.emial }}"
    assert templates.unknown_names(source) == []

    with pytest.raises(UndefinedError, match="emial"):
        templates.compile(source)(context_of("invitee.created"))
    with pytest.raises(UndefinedError, match="emial"):
        templates.compile("{{ invitee.emial }}")(context_of("invitee.created"))


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ joiner.__init__.__globals__.__builtins__ }}",
    "{{ invitee.__class__.__base__ }}",
    "{{ invitee.update({'email': 'attacker@example.com'}) }}",
    "{{ self._TemplateReference__context }}",
])
@pytest.mark.parametrize("kind", [RenderAs.TEXT, RenderAs.HTML])
def test_sandbox_refuses_python_internals(source: str, kind: RenderAs) -> None:
    render = Templates().compile(source, kind)
    ctx = context_of("invitee.created")

    with pytest.raises((SecurityError, UndefinedError)):
        render(ctx)
    assert ctx["invitee"]["email"] == "jamie.rivera@example.com"


def test_conditions_run_in_the_sandbox_too() -> None:
    condition = Templates().compile_condition("''.__class__.__mro__")

    with pytest.raises((SecurityError, UndefinedError)):
        condition(context_of("invitee.created"))


def test_a_condition_is_its_expressions_value_and_nothing_after_it() -> None:
    templates = Templates()
    ctx = context_of("invitee.canceled")

    assert templates.compile_condition("canceler_type == 'invitee' and not rescheduled")(ctx) is True
    assert templates.compile_condition("invitee.email")(ctx) == "jamie.rivera@example.com"
    with pytest.raises(TemplateSyntaxError, match="chunk after expression"):
        templates.compile_condition("rescheduled rescheduled")


def test_what_one_template_sets_is_not_seen_by_the_next() -> None:
    templates = Templates()
    ctx = context_of("invitee.created")

    assert templates.compile("{% set reason = 'set here' %}{{ reason }}")(ctx) == "set here"
    assert templates.compile("[{{ reason }}]")(ctx) == "[]"
    assert templates.compile("{{ range(2) | list }}")(ctx) == "[0, 1]"  # the globals are still there
    assert "range" not in ctx


# --- literal text and {{ name.field }} paths, rendered without a Jinja Context -----------------

class _Shadowing(dict[str, Any]):
    """A mapping with an attribute of the same name as a key (as a model or ``Answers`` may have)."""

    email = "the attribute"


_KEYS = st.sampled_from(["email", "name", "uri", "a", "items", "get", "_private", "class"])
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(["<b>&amp;</b>", "Zoé\r\nBcc: x@y", "a/b c?d=1"]) | st.builds(Markup, st.text(max_size=5)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4)
    | st.dictionaries(_KEYS, inner, max_size=4).map(_Shadowing),
    max_leaves=12,
)
_PATHS = st.lists(_KEYS, min_size=1, max_size=3).map(lambda names: "{{ " + ".".join(names) + " }}")
_LITERALS = st.text(st.characters(blacklist_characters="{}%#", blacklist_categories=("Cs",)), max_size=6)
_SOURCES = st.lists(_PATHS | _LITERALS, max_size=4).map("".join)


def _outcome(render: Any, ctx: dict[str, Any]) -> tuple[str, str]:
    try:
        return ("text", render(ctx))
    except Exception as exc:  # noqa: BLE001 - the error is the outcome compared
        return (type(exc).__name__, str(exc))


@settings(max_examples=300, deadline=None, database=None)
@given(source=_SOURCES, ctx=st.dictionaries(_KEYS, _VALUES, max_size=4), kind=st.sampled_from(list(RenderAs)))
@example(source="{{ a.email }}", ctx={"a": _Shadowing(email="the key")}, kind=RenderAs.TEXT)
@example(source="<{{ a.items }}>", ctx={"a": {"items": "the key"}}, kind=RenderAs.TEXT)
def test_a_template_of_text_and_paths_renders_as_jinja_renders_it(
    source: str, ctx: dict[str, Any], kind: RenderAs
) -> None:
    templates = Templates()
    jinja = limited(_Bound(templates.envs[kind].from_string(source)).render)
    assert _outcome(templates.compile(source, kind), ctx) == _outcome(jinja, ctx)


def test_a_path_through_plain_dicts_does_not_need_jinjas_render() -> None:
    def jinja(_ctx: dict[str, Any]) -> str:
        raise AssertionError("left to Jinja's render")

    env = Templates().envs[RenderAs.HTML]
    source = "Hi {{ invitee.name }}, {{ steps.notify.output.status }}"
    direct = _Direct(env, _direct_parts(env.parse(source)), jinja)
    ctx = {"invitee": {"name": "<Zoé>"}, "steps": {"notify": {"output": {"status": 200}}}}
    assert direct.render(ctx) == "Hi &lt;Zoé&gt;, 200"
    assert _direct_parts(env.parse("{{ invitee.name | upper }}")) is None
    assert _direct_parts(env.parse("{{ payload.items }}")) is None  # dict's own method: the sandbox decides


# --- the context of every shipped sample -----------------------------------------------------


@pytest.mark.parametrize("name", sample_names())
def test_every_shipped_sample_gives_every_documented_name(name: str) -> None:
    body = sample(name)

    ctx = context_of(name)

    assert TOP_NAMES <= set(ctx)
    assert ctx["event"] == body["event"]
    assert ctx["payload"] == body["payload"]
    assert set(ctx["utm"]) == {"source", "medium", "campaign", "content", "term"}
    assert isinstance(ctx["invitee"]["answers"], dict)
    # Every name renders, whatever the event.
    rendered = Templates().compile("{{ status }}{{ reason }}{{ utm.term }}{{ meeting.name }}{{ submission.answers }}")
    assert isinstance(rendered(ctx), str)


@pytest.mark.parametrize(("name", "expected"), [
    ("invitee.canceled", {"status": "canceled", "canceled": True, "canceled_by": "Jamie Rivera",
                          "reason": "I have a conflict that day", "canceler_type": "invitee", "rescheduled": False}),
    ("invitee.canceled.by_host", {"status": "canceled", "canceled": True, "canceled_by": "Morgan Lee",
                                  "reason": "Out sick, sorry!", "canceler_type": "host", "rescheduled": False}),
    ("invitee.canceled.rescheduled", {"canceled": True, "rescheduled": True, "reason": "Rescheduled"}),
    ("invitee.created", {"status": "active", "canceled": False, "canceled_by": None, "reason": None,
                         "canceler_type": None, "rescheduled": False}),
    ("invitee.created.rescheduled", {"status": "active", "canceled": False, "rescheduled": False}),
])
def test_cancellation_facts_come_from_the_payload(name: str, expected: dict[str, Any]) -> None:
    ctx = context_of(name)

    assert {key: ctx[key] for key in expected} == expected


def test_invitee_meeting_and_utm_of_a_booking() -> None:
    ctx = context_of("invitee.created")

    assert ctx["utm"] == {"source": "linkedin", "medium": "social", "campaign": "spring-launch",
                          "content": "carousel-2", "term": "scheduling"}
    invitee = ctx["invitee"]
    assert (invitee["name"], invitee["first_name"], invitee["email"], invitee["timezone"]) == (
        "Jamie Rivera", "Jamie", "jamie.rivera@example.com", "America/New_York")
    assert invitee["answers"] == {
        "Company": "Rivera Consulting", "What would you like to discuss?": "Pricing for 20 seats",
    }
    meeting = ctx["meeting"]
    assert meeting["name"] == "Discovery Call"
    assert meeting["start_time"] == datetime(2027, 3, 4, 15, 0, tzinfo=UTC)
    assert meeting["start_time"].tzinfo is not None and meeting["end_time"].utcoffset() is not None
    assert meeting["uri"] == "https://api.vivocalendar.com/scheduled_events/AAAAAAAAAAAAAAA1"
    assert meeting["location"]["join_url"] == "https://zoom.example.com/j/123"


def test_no_show_names_its_invitee_by_uri() -> None:
    ctx = context_of("invitee_no_show.created")

    assert ctx["invitee"]["uri"] == sample("invitee_no_show.created")["payload"]["invitee"]
    assert ctx["invitee"]["email"] is None and ctx["canceled"] is False


def test_routing_form_submission_fills_submission_and_utm() -> None:
    ctx = context_of("routing_form_submission.created")

    assert ctx["submission"]["answers"] == {
        "Company size": "51-200", "Email": "taylor@example.com", "Which product?": "Teams",
    }
    assert ctx["submission"]["result"] == {
        "type": "event_type", "value": "https://api.vivocalendar.com/event_types/AAAAAAAAAAAAAAAD",
    }
    assert ctx["submission"]["submitter"] is None
    assert (ctx["utm"]["source"], ctx["utm"]["campaign"], ctx["utm"]["term"]) == ("newsletter", "spring", None)
    assert ctx["invitee"]["email"] is None and ctx["status"] is None


def test_older_flat_cancellation_fields_are_still_read() -> None:
    body = sample("invitee.canceled")
    del body["payload"]["cancellation"]
    body["payload"].update(status=None, canceled=True, canceled_by="Morgan Lee", reason="Double booked",
                           canceler_type="host")

    ctx = context_of(body)

    assert (ctx["canceled"], ctx["canceled_by"], ctx["reason"], ctx["canceler_type"]) == (
        True, "Morgan Lee", "Double booked", "host")


def test_unknown_extra_fields_are_tolerated_everywhere() -> None:
    body = sample("invitee.canceled")
    body["brand_new_envelope_field"] = {"x": 1}
    payload = body["payload"]
    payload["brand_new_payload_field"] = [1, 2, 3]
    payload["tracking"]["utm_new"] = "x"
    payload["scheduled_event"]["meeting_notes_html"] = "<p>hi</p>"
    payload["cancellation"]["cancel_source"] = "api"
    payload["questions_and_answers"][0]["question_uuid"] = "e98559a0"

    ctx = context_of(body)

    assert (ctx["reason"], ctx["utm"]["source"], ctx["meeting"]["name"]) == (
        "I have a conflict that day", "linkedin", "Discovery Call")
    assert ctx["invitee"]["answers"]["Company"] == "Rivera Consulting"
    assert ctx["payload"]["brand_new_payload_field"] == [1, 2, 3]


def test_null_fields_give_none_values_that_still_render() -> None:
    body = sample("invitee.canceled")
    body["payload"].update(tracking=None, questions_and_answers=None, scheduled_event=None, cancellation=None,
                           name=None, first_name=None, rescheduled=None, timezone=None, event=None)

    ctx = context_of(body)

    assert ctx["utm"] == dict.fromkeys(["source", "medium", "campaign", "content", "term"])
    assert ctx["invitee"]["answers"] == {} and ctx["invitee"]["name"] is None
    assert ctx["meeting"] == dict.fromkeys(["name", "start_time", "end_time", "location", "uri"])
    assert (ctx["canceled"], ctx["rescheduled"], ctx["reason"]) == (True, False, None)
    render = Templates().compile("Hi {{ invitee.first_name or invitee.name }}{{ utm.source }}{{ meeting.name }}!",
                                 RenderAs.HEADER)
    assert render(ctx) == "Hi !"
