"""Jinja, sandboxed: one environment per kind of output, compiled once per recipe load.

Escaping is decided here and nowhere else. ``finalize`` runs on the value of
every ``{{ expression }}`` and never on the recipe author's literal text, so
an invitee named ``<!channel>`` is escaped for Slack while the author's own
``<!here>`` stays a mention; the same split gives HTML autoescaping, header
values that cannot carry a line break, and URLs whose scheme and host only
the author's literal text can set (event values are percent-encoded).

What a template may cost is decided in ``workers.sandbox``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

from jinja2 import StrictUndefined, Template, nodes
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.meta import find_undeclared_variables
from jinja2.parser import Parser
from jinja2.runtime import Context
from markupsafe import Markup, escape

from connectors.base import RenderAs
from workers.events import INVITEE_KEYS, MEETING_KEYS, SUBMISSION_KEYS, UTM_KEYS, empty_context
from workers.filters import FILTERS
from workers.sandbox import MAX_OUTPUT, LimitedSandbox, TemplateLimitError, check_printable, limited, limited_filter

#: Fields of the context's mappings, for catching ``invitee.emial`` at validation.
KNOWN_FIELDS: dict[str, tuple[str, ...]] = {
    "invitee": INVITEE_KEYS,
    "meeting": MEETING_KEYS,
    "utm": UTM_KEYS,
    "submission": SUBMISSION_KEYS,
    "old": ("invitee", "meeting"),
    "new": ("invitee", "meeting"),
}
TOP_NAMES = frozenset(empty_context("invitee.created"))


def _text(value: Any) -> Any:
    return "" if value is None else value


def _slack(value: Any) -> Any:
    # Slack's own rule: escape & < > in text that should not be read as markup.
    if value is None:
        return ""
    if isinstance(value, Markup):  # the author's explicit `|safe`
        return str(value)
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _header(value: Any) -> Any:
    if value is None:
        return ""
    return " ".join(str(value).splitlines())


def _url(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, Markup):  # the author's explicit `|safe`: a whole URL from a trusted step
        return str(value)
    return quote(str(value), safe="")


def _html(value: Any) -> Any:
    return "" if value is None else escape(value)


def _environment(finalize: Callable[[Any], Any], *, autoescape: bool = False) -> LimitedSandbox:
    env = LimitedSandbox(
        undefined=StrictUndefined, autoescape=autoescape, keep_trailing_newline=True,
        finalize=lambda value: finalize(value if type(value) is str and len(value) <= MAX_OUTPUT
                                        else check_printable(value)),
    )
    env.filters.update(FILTERS)
    env.filters = {name: limited_filter(name, func) for name, func in env.filters.items()}
    return env


class Templates:
    """Compiles recipe templates and conditions into the environment their output needs."""

    def __init__(self) -> None:
        self.envs = {
            RenderAs.TEXT: _environment(_text),
            RenderAs.HTML: _environment(_html, autoescape=True),
            RenderAs.SLACK: _environment(_slack),
            RenderAs.HEADER: _environment(_header),
            RenderAs.URL: _environment(_url),
        }

    def compile(self, source: str, kind: RenderAs = RenderAs.TEXT) -> Callable[[dict[str, Any]], str]:
        """A render function for ``source``; raises ``TemplateSyntaxError`` on bad syntax."""
        env = self.envs[kind]
        ast = env.parse(source)
        parts = _direct_parts(ast)  # before compiling: Jinja's optimizer may rewrite the tree
        render = limited(_Bound(env.from_string(ast)).render)
        return render if parts is None else _Direct(env, parts, render).render

    def compile_condition(self, expression: str) -> Callable[[dict[str, Any]], Any]:
        """An ``if:`` expression: a function of the context giving its value (its truth decides).

        Built as Jinja's ``compile_expression`` builds one: the expression assigned to ``result``.
        """
        env = self.envs[RenderAs.TEXT]
        parser = Parser(env, expression, state="variable")
        expr = parser.parse_expression()
        if not parser.stream.eos:
            raise TemplateSyntaxError("chunk after expression", parser.stream.current.lineno, None, None)
        expr.set_environment(env)
        template = env.from_string(nodes.Template([nodes.Assign(nodes.Name("result", "store"), expr, lineno=1)],
                                                  lineno=1))
        return limited(_Bound(template).value)

    def unknown_names(self, source: str, *, expression: bool = False, steps: Iterable[str] = ()) -> list[str]:
        """Names and fields a template uses that no context will ever have (typos).

        ``steps`` are the ids of the steps before this one: ``steps.<id>`` must be one of them.
        """
        env = self.envs[RenderAs.TEXT]
        ast = env.parse(f"{{{{ {source} }}}}" if expression else source)
        problems = [
            f"unknown name {name!r}" for name in sorted(find_undeclared_variables(ast))
            if name not in TOP_NAMES and name not in env.globals
        ]
        known_steps = set(steps)
        for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
            root, field = _field_access(node)
            if root is None or field is None:
                continue
            if root == "steps" and field not in known_steps:
                problems.append(f"steps.{field}: no earlier step has this id")
            elif root in KNOWN_FIELDS and field not in KNOWN_FIELDS[root] and not field.startswith("__"):
                problems.append(f"{root}.{field}: no such field (known: {', '.join(KNOWN_FIELDS[root])})")
        if internals := _dunders(ast):
            problems.append(f"{', '.join(internals)}: Python internals are not available in templates")
        return problems


class _Bound:
    """A compiled template run against a context as ``Template.render`` runs it, less two copies.

    ``render(ctx)`` copied the context into a dict, then again into one merged with the
    environment's globals through a ``ChainMap``: 13 of a render's 21 µs, and a run of a
    two-step recipe renders eight templates. Here the globals are flattened once, at compile
    time, and each call merges them with the context in one step, as Jinja's ``shared``
    contexts take them.
    """

    def __init__(self, template: Template) -> None:
        self.template = template
        self.env = template.environment
        self.globals = dict(template.globals)
        self.root = template.root_render_func

    def _context(self, ctx: dict[str, Any]) -> Context:
        return self.template.new_context({**self.globals, **ctx}, shared=True)

    def render(self, ctx: dict[str, Any]) -> str:
        context = self._context(ctx)
        try:
            return self.env.concat(self.root(context))  # type: ignore[no-any-return]
        except Exception:
            self.env.handle_exception()  # raises it again, its traceback pointing into the template

    def value(self, ctx: dict[str, Any]) -> Any:
        """The ``result`` an expression template (see ``compile_condition``) assigns."""
        context = self._context(ctx)
        for _ in self.root(context):
            pass
        return context.vars["result"]


#: A ``{{ name.field.field }}`` of a ``_Direct`` template: the name, then the fields.
_Path = tuple[str, tuple[str, ...]]
_MISSING = object()


class _Direct:
    """A template of literal text and ``{{ name.field… }}`` paths, rendered without a Jinja Context.

    Most recipe inputs are such templates (``"{{ invitee.email }}"``), and a Jinja render of one
    costs ~20 µs: a Context, a generator, the sandbox's clock. Jinja's own code for a path is
    ``str(environment.finalize(environment.getattr(value, 'field')))`` (``escape`` for HTML);
    here each field is looked up in plain dicts and the value goes through the same ``finalize``
    and ``str``/``escape``, then the same ``concat``. Whatever else it meets (a name the context
    lacks, a value that is not a plain dict, an error) goes to ``full``, Jinja's render, which
    gives that case's text or error as before.
    """

    def __init__(self, env: LimitedSandbox, parts: list[str | _Path], full: Callable[[dict[str, Any]], str]) -> None:
        self.parts = parts
        self.finalize = env.finalize
        self.to_string: Callable[[Any], str] = escape if env.autoescape else str
        self.concat = env.concat
        self.full = full

    def render(self, ctx: dict[str, Any]) -> str:
        pieces = []
        for part in self.parts:
            if type(part) is str:
                pieces.append(part)
                continue
            name, fields = part
            value = ctx.get(name, _MISSING)
            for field in fields:
                if type(value) is not dict or field not in value:
                    return self.full(ctx)
                value = value[field]
            if value is _MISSING:
                return self.full(ctx)
            try:
                pieces.append(self.to_string(self.finalize(value)))
            except Exception:  # noqa: BLE001 - Jinja's render raises it as a template error
                return self.full(ctx)
        try:
            return self.concat(pieces)  # type: ignore[no-any-return]
        except Exception:  # noqa: BLE001 - past MAX_OUTPUT: the same error, from Jinja's render
            return self.full(ctx)


def _direct_parts(ast: nodes.Template) -> list[str | _Path] | None:
    """The literal text and paths of a template that is nothing else, in order; None otherwise.

    A field is left out if it names an attribute of ``dict`` (``items``, ``keys``…): Jinja
    looks attributes up before keys, and the sandbox then decides.
    """
    if not ast.body:
        return []
    if len(ast.body) != 1 or not isinstance(ast.body[0], nodes.Output):
        return None
    parts: list[str | _Path] = []
    for node in ast.body[0].nodes:
        if isinstance(node, nodes.TemplateData):
            parts.append(node.data)
            continue
        fields: list[str] = []
        while isinstance(node, nodes.Getattr) and not node.attr.startswith("_") and not hasattr(dict, node.attr):
            fields.append(node.attr)
            node = node.node
        if not isinstance(node, nodes.Name) or node.ctx != "load":
            return None
        parts.append((node.name, tuple(reversed(fields))))
    return parts


def _dunders(ast: nodes.Template) -> list[str]:
    """``x.__class__``, ``x['__globals__']``, ``x|attr('__init__')``: said at validation, not only at render.

    The sandbox refuses them at render anyway; no event field or template value is named so.
    """
    found: list[str] = []
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            name: Any = node.attr
        elif isinstance(node, nodes.Getitem):
            name = node.arg.value if isinstance(node.arg, nodes.Const) else None
        else:
            named = node.name == "attr" and node.args and isinstance(node.args[0], nodes.Const)
            name = node.args[0].value if named else None
        if isinstance(name, str) and name.startswith("__"):
            found.append(name)
    return sorted(set(found))


def _field_access(node: nodes.Node) -> tuple[str | None, str | None]:
    """``invitee.email`` or ``invitee['email']`` → ("invitee", "email"); anything else → (None, None)."""
    target = node.node  # type: ignore[attr-defined]
    if not isinstance(target, nodes.Name) or target.ctx != "load":
        return None, None
    if isinstance(node, nodes.Getattr):
        return target.name, node.attr
    arg = node.arg  # type: ignore[attr-defined]
    if isinstance(arg, nodes.Const) and isinstance(arg.value, str):
        return target.name, arg.value
    return None, None


__all__ = ["Templates", "TemplateError", "TemplateLimitError", "KNOWN_FIELDS"]
