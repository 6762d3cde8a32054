"""Known Jinja escapes and resource bombs in recipes (SPEC §6): refused, never hanging, never leaking.

Each row is a recipe a hostile or careless author could write. It is refused where that can be
known, when the recipe loads (``vivoflow validate`` reads the same errors), or else its step
fails when it runs, with an error that says why. The runs go through the real engine and store.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from tests.harness import SIGNING_KEY, fixture_body, write_config
from tests.security.conftest import assert_no_traceback
from tests.security.inprocess import InProcessIntake
from workers.app import App
from workers.config import load_config
from workers.engine import Engine
from workers.recipes import RecipeFolder
from workers.redaction import Redactor
from workers.sandbox import RENDER_SECONDS
from workers.signing import sign

#: What must never appear in an error shown to a recipe author: Python's own names and addresses.
LEAKS = ("0x", "<class", "<function", "<module", "<built-in", "__builtins__", "jinja2.", "site-packages",
         "Traceback", "posix", "subprocess")

TOO_SLOW = f"template took longer than {RENDER_SECONDS:g} s"
# id: (template, where it is refused, what the error says)
VALIDATION, RENDER = "validation", "render"
CASES: dict[str, tuple[str, str, str]] = {
    # Python internals, as in every published Jinja sandbox escape.
    "__class__": ("{{ ''.__class__ }}", VALIDATION, "__class__: Python internals are not available"),
    "__subclasses__": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", VALIDATION, "__subclasses__"),
    "invitee-__base__": ("{{ invitee.__class__.__base__.__subclasses__() }}", VALIDATION, "__base__"),
    "__globals__": ("{{ payload.get.__globals__ }}", VALIDATION, "__globals__"),
    "item-__globals__": ("{{ payload.get['__globals__'] }}", VALIDATION, "__globals__"),
    "cycler-globals": ("{{ cycler.__init__.__globals__.os }}", VALIDATION, "__globals__, __init__"),
    "joiner-builtins": ("{{ joiner.__init__.__globals__.__builtins__ }}", VALIDATION, "__builtins__"),
    "lipsum-globals": ("{{ lipsum.__globals__['os'].popen('id').read() }}", VALIDATION, "unknown name 'lipsum'"),
    "self-__init__": ("{{ self.__init__ }}", VALIDATION, "__init__"),
    "namespace-__init__": ("{{ namespace.__init__.__globals__ }}", VALIDATION, "__globals__"),
    "attr-filter": ("{{ invitee|attr('__class__') }}", VALIDATION, "__class__"),
    "self-private-context": ("{{ self._TemplateReference__context }}", RENDER, "unsafe"),
    "namespace-printed": ("{{ namespace }}", RENDER, "cannot be printed: it would show Python internals"),
    "cycler-printed": ("{{ cycler }}", RENDER, "cannot be printed"),
    # Format strings reach attributes, and print objects, without a dot in the template.
    "format-attribute": ('{{ "{0.__class__}".format(invitee) }}', RENDER, "unsafe"),
    "format-deep": ('{{ "{0.__init__.__globals__}".format(cycler) }}', RENDER, "cannot be printed"),
    "format-object": ('{{ "{}".format(range) }}', RENDER, "cannot be printed"),
    "percent-object": ('{{ "%s" % cycler }}', RENDER, "cannot be printed"),
    "percent-tuple": ('{{ "%s %s" % (invitee.name, namespace) }}', RENDER, "cannot be printed"),
    "format-filter": ('{{ "%s"|format(joiner) }}', RENDER, "cannot be printed"),
    "format-width": ("{{ '{:>999999999}'.format(1) }}", RENDER, "format field too wide"),
    "percent-width": ("{{ '%999999999d' % 1 }}", RENDER, "% format field too wide"),
    "percent-star-width": ("{{ '%*d' % (999999999, 1) }}", RENDER, "'*' widths are not allowed"),
    "format-filter-width": ("{{ '%999999999s'|format('x') }}", RENDER, "% format field too wide"),
    # Work and memory bombs.
    "range-10**9": ("{{ range(10**9)|length }}", RENDER, "range too long"),
    "string-times-10**10": ("{{ ('a' * 10**10)|length }}", RENDER, "'*' result too long"),
    "list-times-10**10": ("{{ ([1] * 10**10)|length }}", RENDER, "'*' result too long"),
    "big-strings-times": ("{{ (['x' * 100000] * 100)|join }}", RENDER, "'*' result too long to print"),
    "power-tower": ("{{ 10 ** (10 ** 10) }}", RENDER, "'**' result too large"),
    "squaring-loop": ("{% set ns = namespace(n=7) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}"
                      "{% endfor %}{{ ns.n }}", RENDER, "'*' result too large"),
    "doubling-loop": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                      "{% endfor %}{{ ns.s|length }}", RENDER, "too long to print"),
    "shared-list-tower": ("{% set a = [payload, payload, payload, payload] %}{% set b = [a, a, a, a] %}"
                          "{% set c = [b, b, b, b] %}{% set d = [c, c, c, c] %}{% set e = [d, d, d, d] %}"
                          "{% set f = [e, e, e, e] %}{{ f }}", RENDER, "too long to print"),
    "replace-bomb": ("{{ ('a' * 100000)|replace('a', 'b' * 100000) }}", RENDER, "replace result too long"),
    "center-bomb": ("{{ 'a'|center(1000000000) }}", RENDER, "width too large"),
    "ljust-bomb": ("{{ 'a'.ljust(1000000000) }}", RENDER, "width too large"),
    "join-bomb": ("{{ range(100000)|join('x' * 100000) }}", RENDER, "join result too long"),
    "lipsum-call": ("{{ lipsum(1000000000) }}", VALIDATION, "unknown name 'lipsum'"),
    "macro-recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", RENDER, "nest too deeply"),
    # Whichever limit a loaded machine meets first: the output cap, or the clock.
    "nested-loops-printing": ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                              RENDER, "template output larger than 1 MB|" + TOO_SLOW),
    "nested-loops-silent": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                            RENDER, TOO_SLOW),
    "nested-loops-over-one-list": ("{% set r = range(100000)|list %}{% for i in r %}{% for j in r %}"
                                   "{% endfor %}{% endfor %}", RENDER, TOO_SLOW),
}


@dataclass
class Outcome:
    """Where a recipe was refused and what it said; ``seconds`` is how long its run took."""

    where: str
    error: str
    seconds: float = 0.0
    run: dict[str, Any] | None = None


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Callable[..., Outcome]]:
    """Run one recipe on one fresh booking through the real intake, engine and store."""
    folder = tmp_path_factory.mktemp("sandbox")
    namespace = f"test-sandbox-{uuid.uuid4().hex[:8]}"
    config_path = write_config(folder, redis_url=redis_url, namespace=namespace)
    app = App(load_config(config_path))
    intake = InProcessIntake(config_path)

    def run(recipe: str) -> Outcome:
        case = folder / f"case-{uuid.uuid4().hex[:8]}"
        case.mkdir()
        (case / "probe.yaml").write_text(recipe)
        recipes = RecipeFolder(case, app.registry, app.templates)
        if recipes.current().errors:
            return Outcome(VALIDATION, "; ".join(str(e) for e in recipes.current().errors))
        engine = Engine(app.store, app.registry, recipes, schedule=lambda run_id, delay: None,
                        redact=Redactor(app.secrets()))
        body = json.loads(fixture_body("invitee.created"))
        body["payload"]["uri"] += case.name  # a booking of its own: never a repeat of another case's
        raw = json.dumps(body).encode()
        answer = intake.post(raw, [(b"content-type", b"application/json"),
                                   (b"vivocalendar-webhook-signature", sign(raw, SIGNING_KEY).encode())])
        assert answer.status == 202, answer.body
        delivery_id = answer.json()["delivery_id"]
        started = time.monotonic()
        worker = threading.Thread(target=engine.run_delivery, args=(delivery_id,), daemon=True)
        worker.start()
        worker.join(RENDER_SECONDS * 4 + 5)
        assert not worker.is_alive(), "the run is still going: the template was not stopped"
        seconds = time.monotonic() - started
        [run_] = app.store.runs_of_delivery(delivery_id)
        steps = app.store.steps_of(run_["id"])
        errors = [s["error"] for s in steps if s["status"] == "failed"]
        where = RENDER if run_["status"] == "failed" else run_["status"]
        return Outcome(where, "; ".join(errors) or run_["reason"] or "", seconds, run_)

    yield run
    intake.close()
    app.close()
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{namespace}*"):
        client.delete(key)
    client.close()


def one_step(template: str) -> str:
    return ("on: invitee.created\nsteps:\n  - id: probe\n    use: log.write\n    with:\n      message: "
            + json.dumps(template) + "\n")


@pytest.mark.parametrize(("template", "where", "says"), CASES.values(), ids=CASES.keys())
def test_hostile_template_is_refused_at_load_or_fails_its_step_saying_why(
    sandbox: Callable[..., Outcome], caplog: pytest.LogCaptureFixture, template: str, where: str, says: str,
) -> None:
    outcome = sandbox(one_step(template))

    assert outcome.where == where, outcome
    assert any(alternative in outcome.error for alternative in says.split("|")), outcome.error
    if where == RENDER:
        assert outcome.error.startswith("template: ")
        # Stopped, not hung: the limit is CPU time, so a loaded machine stretches the wall time.
        assert outcome.seconds < RENDER_SECONDS * 10, outcome.seconds
    # Quoting the author's own words back is no leak; anything else from the list is.
    assert not [leak for leak in LEAKS if leak in outcome.error and leak not in template], outcome.error
    assert_no_traceback(caplog)


def test_conditions_are_limited_like_inputs(sandbox: Callable[..., Outcome]) -> None:
    recipe_if = sandbox("on: invitee.created\nif: range(10**9)|length > 0\n"
                        "steps:\n  - id: probe\n    use: log.write\n    with: {message: hi}\n")
    step_if = sandbox("on: invitee.created\nsteps:\n  - id: probe\n    use: log.write\n"
                      "    if: \"'a' * 10**10\"\n    with: {message: hi}\n")

    assert recipe_if.where == RENDER and recipe_if.error == "if: range too long (items): 1,000,000,000 is over " \
                                                            "the limit of 100,000"
    assert step_if.where == RENDER and step_if.error.startswith("if: '*' result too long")


def test_python_errors_in_a_template_fail_the_step_not_the_worker(sandbox: Callable[..., Outcome]) -> None:
    outcome = sandbox(one_step("{{ 1 / 0 }}"))

    assert outcome.where == RENDER
    assert outcome.error == "template: ZeroDivisionError: division by zero"


def test_jinja_reads_a_power_tower_left_to_right_so_it_stays_small(sandbox: Callable[..., Outcome]) -> None:
    """``10 ** 10 ** 10`` is ``(10 ** 10) ** 10`` in Jinja: a 101-digit number, rendered at once.

    The right-nested tower, ``10 ** (10 ** 10)``, is the bomb; the table above shows it refused.
    """
    outcome = sandbox(one_step("{{ 10 ** 10 ** 10 }}"))

    assert outcome.where == "succeeded", outcome


def test_ordinary_templates_are_untouched_by_the_limits(sandbox: Callable[..., Outcome]) -> None:
    """What recipes really do: loops, filters, formats, arithmetic, a few hundred kB of output."""
    template = (
        "{% for q, a in invitee.answers.items() %}{{ q }}: {{ a }}\n{% endfor %}"
        "{{ '%05d' % 42 }} {{ '{:>8}'.format(invitee.first_name) }} {{ 2 ** 64 }} {{ ['a', 'b'] + ['c'] }}"
        " {{ range(3)|list }} {{ payload|tojson|length > 100 }} {{ invitee.name|replace(' ', '_') }}"
        "{{ ('x' * 1000 ~ '\n') * 50 }}{% for i in range(20000) %}{{ loop.index }}{% endfor %}"
    )

    outcome = sandbox(one_step(template))

    assert outcome.where == "succeeded", outcome
