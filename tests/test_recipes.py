"""Recipe loading and validation: every problem is one error at the exact ``file:line``.

Real parts only: the installed connectors (entry points), the real Templates, files on disk.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from connectors.base import ConnectorRegistry
from tests.harness import wait_until
from workers.durations import parse_duration
from workers.recipes import Recipe, RecipeFolder, load_book, load_recipe, recipe_files
from workers.templating import Templates
from workers.yamlsource import load_with_lines

SHIPPED = Path(__file__).resolve().parents[1] / "recipes"

GOOD = """\
name: {name}
on: {on}
steps:
  - id: note
    use: log.write
    with: {{message: "{{{{ invitee.name }}}} booked"}}
"""


@pytest.fixture
def registry(tmp_path: Path) -> ConnectorRegistry:
    found = ConnectorRegistry.discover()
    found.configure({}, base_dir=tmp_path)
    return found


@pytest.fixture
def templates() -> Templates:
    return Templates()


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def good(name: str, on: str = "invitee.created") -> str:
    return GOOD.format(name=name, on=on)


# Each case: a recipe with exactly one mistake, the line it is on, and what the message must say.
BROKEN: list[tuple[str, str, int, str]] = [
    ("unknown_top_level_key", """\
        on: invitee.created
        steps:
          - {id: a, use: log.write, with: {message: hi}}
        colour: red
        """, 4, "colour: unknown key"),
    ("unknown_step_key", """\
        on: invitee.created
        steps:
          - id: a
            use: log.write
            wiht: {message: hi}
        """, 5, "steps.0.wiht: unknown key"),
    ("unknown_use", """\
        on: invitee.created
        steps:
          - id: a
            use: log.shout
            with: {message: hi}
        """, 4, "unknown action 'log.shout'"),
    ("missing_required_input", """\
        on: invitee.created
        steps:
          - id: mail
            use: email.send
            with:
              subject: Hello
              text: Hi there
        """, 5, "steps.mail.with: email.send needs input 'to'"),
    ("unknown_input_name", """\
        on: invitee.created
        steps:
          - id: a
            use: log.write
            with:
              message: hi
              colour: red
        """, 7, "steps.a.with.colour: log.write has no input 'colour'"),
    ("jinja_syntax_error", """\
        on: invitee.created
        steps:
          - id: a
            use: log.write
            with:
              message: "{{ invitee.name "
        """, 6, "steps.a.with.message: template syntax error"),
    ("jinja_syntax_error_in_block_scalar", """\
        on: invitee.created
        steps:
          - id: mail
            use: email.send
            with:
              to: someone@example.com
              subject: Hello
              text: |
                Hello
                {% if reason %}unclosed
        """, 8, "steps.mail.with.text: template syntax error"),
    ("unknown_event", """\
        on: invitee.cancelled
        steps:
          - {id: a, use: log.write, with: {message: hi}}
        """, 1, "on: unknown event 'invitee.cancelled'"),
    ("unknown_event_in_list", """\
        on:
          - invitee.created
          - invitee.cancelled
        steps:
          - {id: a, use: log.write, with: {message: hi}}
        """, 3, "on: unknown event 'invitee.cancelled'"),
    ("field_typo", """\
        on: invitee.created
        steps:
          - id: a
            use: log.write
            with:
              message: "{{ invitee.emial }}"
        """, 6, "steps.a.with.message: invitee.emial: no such field"),
    ("field_typo_in_item_syntax", """\
        on: invitee.created
        steps:
          - id: a
            use: log.write
            with:
              message: "{{ meeting['start'] }}"
        """, 6, "meeting.start: no such field"),
    ("field_typo_in_condition", """\
        on: invitee.created
        if: utm.sorce == "linkedin"
        steps:
          - {id: a, use: log.write, with: {message: hi}}
        """, 2, "if: utm.sorce: no such field"),
    ("unknown_top_level_name", """\
        on: invitee.created
        steps:
          - id: a
            use: log.write
            with:
              message: "{{ invite.email }}"
        """, 6, "unknown name 'invite'"),
    ("steps_output_of_unknown_step", """\
        on: invitee.created
        steps:
          - id: a
            use: log.write
            with:
              message: "{{ steps.nope.output }}"
        """, 6, "steps.nope: no earlier step has this id"),
    ("steps_output_of_later_step", """\
        on: invitee.created
        steps:
          - id: a
            use: log.write
            with:
              message: "{{ steps.b.output }}"
          - {id: b, use: log.write, with: {message: hi}}
        """, 6, "steps.b: no earlier step has this id"),
    ("duplicate_step_id", """\
        on: invitee.created
        steps:
          - {id: a, use: log.write, with: {message: one}}
          - {id: a, use: log.write, with: {message: two}}
        """, 4, "'a' is used by an earlier step"),
    ("yaml_syntax_error", """\
        on: invitee.created
        steps:
          - id: a
            use: log.write
             with: {message: hi}
        """, 5, "not valid YAML"),
    ("duplicate_yaml_key", """\
        on: invitee.created
        steps:
          - {id: a, use: log.write, with: {message: hi}}
        on: invitee.canceled
        """, 4, "duplicate key 'on'"),
    ("duplicate_yaml_key_nested", """\
        on: invitee.created
        steps:
          - id: a
            use: log.write
            with:
              message: one
              message: two
        """, 7, "duplicate key 'message'"),
    ("bad_duration", """\
        on: invitee.created
        steps:
          - id: a
            use: log.write
            delay: soon
            with: {message: hi}
        """, 5, "steps.0.delay: 'soon' is not a duration"),
    ("delay_and_at_together", """\
        on: invitee.created
        steps:
          - id: a
            use: log.write
            delay: 1h
            at: "{{ meeting.start_time }}"
            with: {message: hi}
        """, 3, "use either delay or at"),
    ("missing_steps", """\
        # no steps at all
        on: invitee.created
        """, 2, "steps: required key is missing"),
]


@pytest.mark.parametrize(("text", "line", "message"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_each_recipe_mistake_is_one_error_at_its_file_and_line(
    tmp_path: Path, registry: ConnectorRegistry, templates: Templates, text: str, line: int, message: str
) -> None:
    path = write(tmp_path, "broken.yaml", text)

    recipe, errors = load_recipe(path, registry, templates)

    assert recipe is None
    assert len(errors) == 1, [str(e) for e in errors]
    assert (errors[0].file, errors[0].line) == (str(path), line)
    assert str(errors[0]).startswith(f"{path}:{line}: ")
    assert message in errors[0].message


def test_on_is_read_as_the_string_it_looks_like_not_a_boolean(
    tmp_path: Path, registry: ConnectorRegistry, templates: Templates
) -> None:
    data, _ = load_with_lines("on: invitee.created\nyes: no\nflag: true\n")
    assert data == {"on": "invitee.created", "yes": "no", "flag": True}

    path = write(tmp_path, "flags.yaml", """\
        on: [invitee.created, invitee.canceled]
        steps:
          - id: later
            use: log.write
            delay: 2d
            skip_if_canceled: false
            with: {message: hi}
        """)
    recipe, errors = load_recipe(path, registry, templates)

    assert errors == []
    assert recipe is not None
    assert recipe.name == "flags"  # defaults to the file name
    assert recipe.events == ("invitee.created", "invitee.canceled")
    assert recipe.steps[0].spec.skip_if_canceled is False


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("15m", 900), ("24h", 86_400), ("2d", 172_800), ("-24h", -86_400), (90, 90),
])
def test_durations_are_written_with_a_unit(text: str | int, seconds: int) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["soon", "24", "1.5h", "h", ""])
def test_a_duration_without_a_known_unit_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_one_broken_recipe_never_stops_the_others(
    tmp_path: Path, registry: ConnectorRegistry, templates: Templates
) -> None:
    write(tmp_path, "a-good.yaml", good("welcome"))
    broken = write(tmp_path, "b-broken.yaml", good("broken").replace("log.write", "log.shout"))

    book = load_book(tmp_path, registry, templates)

    assert [r.name for r in book.matching("invitee.created")] == ["welcome"]
    assert list(book.recipes) == ["welcome"]
    assert [(e.file, e.line) for e in book.errors] == [(str(broken), 5)]
    assert "log.shout" in book.errors[0].message


def test_recipes_are_indexed_by_each_of_their_events(
    tmp_path: Path, registry: ConnectorRegistry, templates: Templates
) -> None:
    write(tmp_path, "both.yaml", good("both", on="[invitee.created, invitee.canceled]"))
    write(tmp_path, "created.yaml", good("created"))
    write(tmp_path, "form.yml", good("form", on="routing_form_submission.created"))
    write(tmp_path, "notes.txt", "not a recipe")

    book = load_book(tmp_path, registry, templates)

    assert book.errors == []
    assert [r.name for r in book.matching("invitee.created")] == ["both", "created"]
    assert [r.name for r in book.matching("invitee.canceled")] == ["both"]
    assert [r.name for r in book.matching("routing_form_submission.created")] == ["form"]
    assert book.matching("invitee_no_show.created") == []


def test_a_recipe_name_used_by_two_files_is_an_error_on_the_second(
    tmp_path: Path, registry: ConnectorRegistry, templates: Templates
) -> None:
    write(tmp_path, "a.yaml", good("welcome"))
    second = write(tmp_path, "b.yaml", "# a copy of a.yaml\n\n" + good("welcome", on="invitee.canceled"))

    book = load_book(tmp_path, registry, templates)

    assert book.recipes["welcome"].file.name == "a.yaml"
    assert book.matching("invitee.canceled") == []
    assert [(e.file, e.line) for e in book.errors] == [(str(second), 3)]
    assert book.errors[0].message == "name: 'welcome' is already used by a.yaml"


def test_a_missing_recipes_folder_is_an_error_not_a_crash(registry: ConnectorRegistry, tmp_path: Path) -> None:
    book = load_book(tmp_path / "nowhere", registry, Templates())

    assert book.recipes == {}
    assert len(book.errors) == 1 and "recipes.dir" in book.errors[0].message


def test_every_shipped_recipe_loads_without_errors(registry: ConnectorRegistry, templates: Templates) -> None:
    book = load_book(SHIPPED, registry, templates)

    assert [str(e) for e in book.errors] == []
    assert len(book.recipes) == len(recipe_files(SHIPPED))
    assert {"booking-confirmation", "cancel-followup", "utm-campaign-leads"} <= set(book.recipes)


def _names_for(folder: RecipeFolder, event: str) -> list[str]:
    return [r.name for r in folder.current().matching(event)]


def _bump_mtime(path: Path) -> None:
    # Some file systems keep whole seconds; move the mtime clearly forward so the change is seen.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))


def test_recipe_folder_reloads_an_edited_file_without_a_restart(
    tmp_path: Path, registry: ConnectorRegistry, templates: Templates
) -> None:
    path = write(tmp_path, "welcome.yaml", good("welcome"))
    folder = RecipeFolder(tmp_path, registry, templates)
    assert _names_for(folder, "invitee.created") == ["welcome"]

    path.write_text(good("welcome", on="invitee.canceled"))
    _bump_mtime(path)

    wait_until(lambda: _names_for(folder, "invitee.canceled") == ["welcome"], timeout=5)
    assert _names_for(folder, "invitee.created") == []


def test_recipe_folder_picks_up_added_broken_and_removed_files(
    tmp_path: Path, registry: ConnectorRegistry, templates: Templates
) -> None:
    first = write(tmp_path, "first.yaml", good("first"))
    folder = RecipeFolder(tmp_path, registry, templates)

    write(tmp_path, "second.yaml", good("second"))
    wait_until(lambda: _names_for(folder, "invitee.created") == ["first", "second"], timeout=5)

    first.write_text(good("first").replace("log.write", "log.shout"))
    _bump_mtime(first)
    wait_until(lambda: folder.current().errors, timeout=5)
    assert _names_for(folder, "invitee.created") == ["second"]
    assert [e.file for e in folder.current().errors] == [str(first)]

    first.unlink()
    wait_until(lambda: not folder.current().errors, timeout=5)
    assert _names_for(folder, "invitee.created") == ["second"]


def test_a_loaded_recipe_is_compiled_once_with_its_steps_in_order(
    tmp_path: Path, registry: ConnectorRegistry, templates: Templates
) -> None:
    path = write(tmp_path, "two.yaml", """\
        on: invitee.created
        if: utm.source == "linkedin"
        steps:
          - id: note
            use: log.write
            with: {message: "{{ invitee.email }}"}
          - id: mail
            use: email.send
            retry: {max_attempts: 2}
            on_error: continue
            with:
              to: "{{ invitee.email }}"
              subject: "Re: {{ steps.note.output }}"
              text: hi
        """)

    recipe, errors = load_recipe(path, registry, templates)

    assert errors == []
    assert isinstance(recipe, Recipe)
    assert [(s.id, s.connector, s.action.name, s.max_attempts) for s in recipe.steps] == [
        ("note", "log", "write", 1), ("mail", "email", "send", 2),
    ]
    assert recipe.condition is not None and recipe.condition_source == 'utm.source == "linkedin"'
    assert recipe.steps[1].spec.on_error == "continue"
