"""The sandbox's limits: what one template render may cost, each rule with its reason.

Jinja's sandbox keeps templates away from Python's internals; it does not stop
a template that loops for an hour or prints a gigabyte. A render here is
stopped past ``RENDER_SECONDS``, and nothing it builds or prints may grow past
``MAX_OUTPUT``; the checks are cooperative (a clock read in calls, attribute
access, loops and output), so every builtin a template can reach is kept small.
"""

from __future__ import annotations

import functools
import re
import sys
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, MappingView
from contextvars import ContextVar
from copy import copy
from itertools import islice
from string import Formatter
from typing import Any

from jinja2 import Undefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError, TemplateRuntimeError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

#
# Jinja's sandbox keeps a template away from Python's internals; it does not bound what the
# template costs. The rules below do, cooperatively: the clock is read at every call, attribute
# and item lookup, loop step and output piece, and every operation that can multiply a value's
# size is checked *before* it runs, so no single builtin call (which the clock cannot interrupt)
# is handed enough to run long. A template past a limit fails its step with TemplateLimitError
# saying which limit; the worker goes on with the next message.

#: Most CPU time one render may take. Recipes render in milliseconds; a template still running after
#: this is a loop gone wrong (or an attack), and it holds a worker thread while it runs.
RENDER_SECONDS = 2.0
#: Most characters one template may output, and most that any value it prints may hold (1 MB):
#: more than any email, Slack message or API body a recipe sends.
MAX_OUTPUT = 1_000_000
#: Most one repetition may produce: ``'a' * n``, ``[x] * n``, ``range(n)`` (Jinja's own range
#: limit), a width (``center``, ``ljust``, ``%10d``, ``{:>10}``), a ``batch`` or ``slice`` count.
MAX_REPEAT = 100_000
#: Largest integer a template may compute, in bits: ``10 ** (10 ** 10)`` would need 33 billion.
MAX_INT_BITS = 4096
#: Deepest a printed value may nest: deeper is a structure built to make ``str()`` explode.
MAX_DEPTH = 64


class TemplateLimitError(SecurityError):
    """A template went past one of the limits above; the message says which."""


#: When the render running in this thread must stop, in the thread's CPU time (``time.thread_time``):
#: a busy machine slows a render down without making it any more expensive. None outside a render.
_deadline: ContextVar[float | None] = ContextVar("vivoflow_render_deadline", default=None)


def _check_time() -> None:
    deadline = _deadline.get()
    if deadline is not None and time.thread_time() > deadline:
        raise TemplateLimitError(f"template took longer than {RENDER_SECONDS:g} s")


def _at_most(size: Any, limit: int, what: str) -> None:
    if isinstance(size, int) and size > limit:
        raise TemplateLimitError(f"{what}: {size:,} is over the limit of {limit:,}")


def _internal(value: Any) -> bool:
    """Classes, functions, generators, modules and objects with no text of their own print Python's
    names and memory addresses (``<function … at 0x7f…>``): never something to send anyone."""
    internal = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType,
                types.GeneratorType)
    kind = type(value)
    return isinstance(value, internal) or (kind.__str__ is object.__str__ and kind.__repr__ is object.__repr__)


def _printed_size(value: Any, *, printing: bool = True) -> int:
    """About how many characters ``str(value)`` prints, counted only until past ``MAX_OUTPUT``.

    Containers are walked, not printed: ``[a, a]`` where ``a`` is ``[b, b]``… doubles what
    ``str()`` would print at every level while it costs nothing to build. Structures nested past
    ``MAX_DEPTH`` are refused, and so are Python internals when the value is about to be ``printing``.
    """
    if isinstance(value, str | bytes):  # the common case, in O(1)
        return len(value)
    total, stack = 0, [(value, 0)]
    while stack and total <= MAX_OUTPUT:
        item, depth = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item) + 2
        elif isinstance(item, int | float | None):  # bool is an int
            total += len(repr(item))
        elif isinstance(item, Mapping | MappingView | list | tuple | set | frozenset | Namespace):
            if depth >= MAX_DEPTH:
                raise TemplateLimitError(f"a value nested deeper than {MAX_DEPTH} levels cannot be printed")
            parts = item._Namespace__attrs if isinstance(item, Namespace) else item
            total += 2 + 2 * len(parts)
            members = (x for pair in parts.items() for x in pair) if isinstance(parts, Mapping) else parts
            stack.extend((member, depth + 1) for member in members)
        elif isinstance(item, Undefined):  # its own error (naming the typo) comes when it is printed
            continue
        elif printing and _internal(item):
            hint = " (add |list or |join)" if isinstance(item, types.GeneratorType) else ""
            raise TemplateLimitError(f"a {type(item).__name__} cannot be printed: it would show Python internals{hint}")
        else:
            total += 16
    return total


def check_printable(value: Any) -> Any:
    """``value``, unless printing it would show Python internals or more than ``MAX_OUTPUT`` characters."""
    _at_most(_printed_size(value), MAX_OUTPUT, "value too long to print (characters)")
    return value


def _check_result(value: Any) -> Any:
    """What a call or filter returned, unless it is a string or list past ``MAX_OUTPUT``."""
    if isinstance(value, str | bytes | list | tuple | dict):
        _at_most(len(value), MAX_OUTPUT, "result too long (items)")
    return value


def _check_binop(operator: str, left: Any, right: Any) -> None:
    sequence = str | bytes | list | tuple
    if operator == "*":  # 'a' * n and [x] * n: the result is n times as long, and prints n times
        for items, times in ((left, right), (right, left)):
            if isinstance(items, sequence) and isinstance(times, int) and times > 0:
                _at_most(len(items) * times, MAX_REPEAT, "'*' result too long (items)")
                _at_most(_printed_size(items) * times, MAX_OUTPUT, "'*' result too long to print (characters)")
        if isinstance(left, int) and isinstance(right, int):  # n * n * n…: squaring doubles the digits
            _at_most(left.bit_length() + right.bit_length(), MAX_INT_BITS, "'*' result too large (bits)")
    elif operator == "**":  # 10 ** (10 ** 10) takes minutes and gigabytes to compute
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            _at_most(left.bit_length() * right, MAX_INT_BITS, "'**' result too large (bits)")
    elif operator == "+" and isinstance(left, sequence) and isinstance(right, sequence):
        _at_most(len(left) + len(right), MAX_OUTPUT, "'+' result too long (items)")
    elif operator == "%" and isinstance(left, str):  # '%999999999d' % 1
        _check_printf(left)
        for arg in right if isinstance(right, tuple) else (right,):
            check_printable(arg)


#: One printf conversion (``%-10.3f``, ``%(name)s``): its width and precision.
_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_printf(fmt: str) -> None:
    for width, precision in _PRINTF.findall(fmt):
        for number in (width, precision):
            if number == "*":  # the width would come from the arguments, unchecked
                raise TemplateLimitError("'*' widths are not allowed in % formats: write the number")
            if number:
                _at_most(int(number), MAX_REPEAT, "% format field too wide")


def _check_format_string(fmt: str) -> None:
    """``'{:>999999999}'.format(x)`` builds a gigabyte from nothing: widths are checked first."""
    for _, _, spec, _ in Formatter().parse(fmt):
        if spec and "{" in spec:  # the width would come from the arguments, unchecked
            raise TemplateLimitError("nested fields are not allowed in a format spec: write the number")
        for number in re.findall(r"\d+", spec or ""):
            _at_most(int(number), MAX_REPEAT, "format field too wide")


def _lines(text: Any) -> int:
    return str(text).count("\n") + 1


def _check_replace(s: Any, old: Any, new: Any, count: Any = None) -> None:
    text, old = str(s), str(old)
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    _at_most(len(text) + hits * _printed_size(new), MAX_OUTPUT, "replace result too long (characters)")


def _check_width(value: Any, width: Any = 80, *_: Any) -> None:
    _at_most(width, MAX_REPEAT, "width too large")


def _check_indent(s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    per_line = len(width) if isinstance(width, str) else width
    _at_most(_lines(s) * per_line, MAX_OUTPUT, "indent result too long (characters)")


def _check_wordwrap(s: Any, width: Any = 79, _break: Any = True, wrapstring: Any = None, *_: Any) -> None:
    breaks = len(str(s)) // max(width, 1) + 1 if isinstance(width, int) else 1
    _at_most(breaks * _printed_size(wrapstring or "\n"), MAX_OUTPUT, "wordwrap result too long (characters)")


def _check_urlize(s: Any, trim_url_limit: Any = None, nofollow: Any = False, target: Any = None,
                  rel: Any = None, *_: Any, **__: Any) -> None:
    # target and rel are written into every link: at most one link per word.
    extra = _printed_size(target or "") + _printed_size(rel or "")
    _at_most(3 * len(str(s)) + len(str(s).split()) * extra, MAX_OUTPUT, "urlize result too long (characters)")


def _check_tojson(value: Any, indent: Any = None) -> None:
    step = len(indent) if isinstance(indent, str) else indent or 0
    _at_most(_printed_size(value) * (step + 1), MAX_OUTPUT, "tojson result too long (characters)")


def _check_format_filter(value: Any, *args: Any, **kwargs: Any) -> None:
    _check_printf(str(value))
    for arg in (*args, *kwargs.values()):
        check_printable(arg)


def _count(what: str) -> Callable[..., None]:
    def check(value: Any, count: Any, *_: Any) -> None:
        _at_most(count, MAX_REPEAT, what)
    return check


def _materialized(items: Any) -> list[Any] | tuple[Any, ...] | str:
    return items if isinstance(items, list | tuple | str) else list(items)


def _check_joined(items: Any, separator: Any) -> None:
    size = _printed_size(items) + len(items) * _printed_size(separator)
    _at_most(size, MAX_OUTPUT, "join result too long (characters)")


def _check_sum(items: Any, attribute: Any = None, start: Any = 0) -> None:
    # sum(start=[]) flattens by concatenating: the work grows with the square of the list.
    if isinstance(start, str | bytes | list | tuple):
        _at_most(len(items) * _printed_size(items), MAX_OUTPUT, "sum of sequences: too much work (characters copied)")


def _check_expandtabs(s: str | bytes, tabsize: Any = 8) -> None:
    tabs = s.count("\t" if isinstance(s, str) else b"\t")
    _at_most(len(s) + tabs * tabsize, MAX_OUTPUT, "expandtabs result too long (characters)")


def _check_translate(s: str | bytes, table: Any) -> None:
    # Each character may be replaced by the longest string in the table.
    values = table.values() if isinstance(table, Mapping) else table
    longest = max((len(v) for v in values if isinstance(v, str | bytes)), default=1)
    _at_most(len(s) * longest, MAX_OUTPUT, "translate result too long (characters)")


#: Filters that can make their output much larger than their input, checked before they run;
#: each check takes the filter's own arguments. ``join`` and ``sum`` get a list, counted first.
FILTER_LIMITS: dict[str, Callable[..., None]] = {
    "center": _check_width,
    "indent": _check_indent,
    "format": _check_format_filter,
    "replace": _check_replace,
    "wordwrap": _check_wordwrap,
    "urlize": _check_urlize,
    "tojson": _check_tojson,
    "batch": _count("batch size"),
    "slice": _count("slice count"),
    "join": lambda items, d="", attribute=None: _check_joined(items, d),
    "sum": _check_sum,
}
#: The same for ``str`` methods a template can call; each check gets the string first.
STR_METHOD_LIMITS: dict[str, Callable[..., None]] = {
    "center": _check_width,
    "ljust": _check_width,
    "rjust": _check_width,
    "zfill": _check_width,
    "replace": _check_replace,
    "expandtabs": _check_expandtabs,
    "translate": _check_translate,
    "join": lambda separator, items: _check_joined(items, separator),
}


#: Filters that rearrange, count or pick from their input without printing it: a large one is fine.
UNPRINTED_INPUT = frozenset({
    "attr", "batch", "count", "d", "default", "dictsort", "first", "groupby", "items", "last", "length", "list",
    "map", "max", "min", "random", "reject", "rejectattr", "reverse", "select", "selectattr", "slice", "sort",
    "sum", "unique",
})


def limited_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` with its input checked, the check of ``FILTER_LIMITS`` run first, and its result checked."""
    check = FILTER_LIMITS.get(name)
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0  # the context/environment Jinja passes first
    printed = name not in UNPRINTED_INPUT

    def limited(*args: Any, **kwargs: Any) -> Any:
        _check_time()
        if len(args) > skip:
            if printed:  # str() of a structure built to explode would run inside the filter, unchecked
                _at_most(_printed_size(args[skip], printing=False), MAX_OUTPUT, "filter input too long (characters)")
            if name in ("join", "sum"):  # a generator can be counted only once: list it
                args = (*args[:skip], _materialized(args[skip]), *args[skip + 1:])
            if check is not None:
                check(*args[skip:], **kwargs)
        return _check_result(func(*args, **kwargs))

    return functools.update_wrapper(limited, func)


def _range(*args: int) -> range:
    """Jinja's bounded ``range``, refused as a template error (Jinja's own raises OverflowError)."""
    numbers = range(*args)
    try:
        length = len(numbers)
    except OverflowError:  # longer than a C integer can count
        length = sys.maxsize
    _at_most(length, MAX_REPEAT, "range too long (items)")
    return numbers


def _through(method: str, node: nodes.Expr) -> nodes.Call:
    """``environment.<method>(node)``, as Jinja's extensions reach the environment."""
    return nodes.Call(nodes.EnvironmentAttribute(method, lineno=node.lineno), [node], [], None, None,
                      lineno=node.lineno)


class _LimitedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with the environment's checks around loops and the ``~`` operator."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        # Every step of a loop reads the clock: loops nested over a range made once call
        # nothing else the sandbox would see.
        node = copy(node)
        node.iter = _through("iterate", node.iter)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        # Each operand of ``~`` is checked before it becomes text, and the result after:
        # ``{% set ns.s = ns.s ~ ns.s %}`` in a loop cannot double its way past MAX_OUTPUT.
        node = copy(node)
        node.nodes = [_through("printable", part) for part in node.nodes]
        self.write("environment.printable(")
        super().visit_Concat(node, frame)
        self.write(")")


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, bounded in time and size by the rules above."""

    code_generator_class = _LimitedCodeGenerator
    #: The operators that can make a value much larger than its operands (see _check_binop).
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals["range"] = _range
        # lipsum(n) writes n paragraphs in one call the clock cannot stop; no recipe needs filler.
        del self.globals["lipsum"]

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check_time()
        owner = getattr(obj, "__self__", None)
        check = STR_METHOD_LIMITS.get(getattr(obj, "__name__", "")) if isinstance(owner, str | bytes) else None
        if check is not None and args:
            if obj.__name__ == "join":
                args = (_materialized(args[0]), *args[1:])
            check(owner, *args, **kwargs)
        return _check_result(super().call(context, obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_time()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        sandboxed = super().wrap_str_format(value)
        if sandboxed is None:
            return None
        _check_format_string(value.__self__)

        def checked(*args: Any, **kwargs: Any) -> str:
            for arg in (*args, *kwargs.values()):
                check_printable(arg)
            return _check_result(sandboxed(*args, **kwargs))

        return functools.update_wrapper(checked, sandboxed)

    def concat(self, pieces: Iterable[str]) -> str:  # type: ignore[override]
        """Every output (a template's, a macro's, a ``{% set %}`` block's) is joined here, watched."""
        kept: list[str] = []
        size = 0
        stream = iter(pieces)
        # Joined 32 pieces at a time (each piece is itself checked): per piece, Python would cost more.
        while batch := list(islice(stream, 32)):
            text = "".join(batch)
            size += len(text)
            if size > MAX_OUTPUT:
                raise TemplateLimitError(f"template output larger than 1 MB ({MAX_OUTPUT:,} characters)")
            kept.append(text)
            _check_time()
        return "".join(kept)

    def iterate(self, items: Iterable[Any]) -> Iterator[Any]:
        """Every ``{% for %}`` steps through here (see _LimitedCodeGenerator)."""
        for item in items:
            _check_time()
            yield item

    def printable(self, value: Any) -> Any:
        """Every operand and result of ``~`` goes through here (see _LimitedCodeGenerator)."""
        return check_printable(value)


def limited(render: Callable[..., Any]) -> Callable[..., Any]:
    """``render`` against the clock, with the Python errors a template can provoke made template errors.

    ``1/0``, ``'a' + 1`` or a macro calling itself then fail their step, saying why, like any
    template error; the engine and ``vivoflow try`` catch TemplateError only.
    """

    @functools.wraps(render)
    def run(*args: Any, **kwargs: Any) -> Any:
        deadline = time.thread_time() + RENDER_SECONDS
        outer = _deadline.get()
        token = _deadline.set(deadline if outer is None else min(deadline, outer))
        try:
            return render(*args, **kwargs)
        except TemplateError:
            raise
        except RecursionError:
            raise TemplateLimitError("template calls nest too deeply (a macro calling itself?)") from None
        except (ArithmeticError, LookupError, TypeError, ValueError) as exc:
            raise TemplateRuntimeError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            _deadline.reset(token)

    return run


