"""Reads one call of literal arguments out of a Python syntax tree. Never evaluates.

``ast.parse`` only builds a tree; nothing in the text runs. This module walks
that tree and accepts exactly: a call of a plain name (``click``) or of a name
on an allowed module (``pyautogui.click``), whose positional and keyword
arguments are literals — strings, numbers, ``None``, ``True``/``False``, a
leading minus, and tuples or lists of those. Every other node (names,
attribute access, calls in arguments, f-strings, operators, lambdas,
comprehensions, ``*args``/``**kwargs``, bytes, …) is a :class:`ParseError`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from commander.gui._errors import ParseError

Value = str | int | float | bool | None | tuple["Value", ...]

#: Longest source accepted by :func:`parse_expression` / :func:`parse_module`.
MAX_SOURCE = 20_000
#: Most elements in one tuple or list argument.
MAX_ELEMENTS = 64
#: Deepest nesting of tuples/lists.
MAX_DEPTH = 2
#: Largest magnitude of an integer literal: nothing on a screen or in a count
#: comes near it, and a larger one (``0xfff…`` has no digit limit) could not
#: even be shown in a message (Python refuses ``str()`` of > 4300 digits).
MAX_INT = 10**15 - 1

_NOT_ALLOWED = {
    ast.JoinedStr: "f-strings are not allowed; write a plain quoted string",
    ast.FormattedValue: "f-strings are not allowed; write a plain quoted string",
    ast.Name: "variable names are not allowed in arguments; write literal values",
    ast.Attribute: "attribute access is not allowed",
    ast.Call: "calls inside arguments are not allowed; write literal values",
    ast.Lambda: "lambdas are not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "generator expressions are not allowed",
    ast.BinOp: "arithmetic is not allowed; write the computed number",
    ast.BoolOp: "boolean operators are not allowed",
    ast.Compare: "comparisons are not allowed",
    ast.IfExp: "conditional expressions are not allowed",
    ast.Subscript: "subscripts are not allowed",
    ast.Starred: "*args unpacking is not allowed",
    ast.Dict: "dict literals are not allowed",
    ast.Set: "set literals are not allowed",
    ast.NamedExpr: "assignment expressions are not allowed",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
}


@dataclass(frozen=True, slots=True)
class Call:
    """One call read from the tree: ``pyautogui.click(1, y=2)`` → func ``pyautogui.click``."""

    func: str
    args: tuple[Value, ...]
    kwargs: dict[str, Value] = field(default_factory=dict)
    lineno: int = 1


def _reject(node: ast.AST) -> ParseError:
    msg = _NOT_ALLOWED.get(type(node))
    if msg is None:
        msg = f"{type(node).__name__} expressions are not allowed; write literal values"
    return ParseError(msg, fragment=_source_of(node))


def _source_of(node: ast.AST) -> str | None:
    try:
        return ast.unparse(node)
    except Exception:  # pragma: no cover - unparse of a parsed tree does not fail
        return None


def literal(node: ast.expr, depth: int = 0) -> Value:
    """The value of a literal node, or :class:`ParseError`."""
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, int) and not isinstance(v, bool):
            return _bounded(v)
        if isinstance(v, str | float | bool) or v is None:
            return v
        if isinstance(v, bytes):
            raise ParseError("bytes literals are not allowed; write a plain quoted string")
        raise ParseError(f"the literal {v!r} is not allowed")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = node.operand
        if (
            isinstance(operand, ast.Constant)
            and isinstance(operand.value, int | float)
            and not isinstance(operand.value, bool)
        ):
            value = _bounded(operand.value) if isinstance(operand.value, int) else operand.value
            return -value if isinstance(node.op, ast.USub) else value
        raise _reject(node)
    if isinstance(node, ast.Tuple | ast.List):
        if depth >= MAX_DEPTH:
            raise ParseError("lists nested this deep are not allowed", fragment=_source_of(node))
        if len(node.elts) > MAX_ELEMENTS:
            raise ParseError(f"lists of more than {MAX_ELEMENTS} elements are not allowed")
        return tuple(literal(e, depth + 1) for e in node.elts)
    raise _reject(node)


def _bounded(value: int) -> int:
    if -MAX_INT <= value <= MAX_INT:
        return value
    raise ParseError("integers of more than 15 digits are not accepted")


def _func_name(node: ast.expr, modules: frozenset[str]) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in modules
    ):
        return f"{node.value.id}.{node.attr}"
    raise ParseError(
        "only direct calls of the listed actions are allowed", fragment=_source_of(node)
    )


def call_from_node(node: ast.expr, modules: frozenset[str] = frozenset()) -> Call:
    """Reads a call node whose callee is a name or ``module.name`` for a module in ``modules``."""
    if not isinstance(node, ast.Call):
        raise ParseError("expected an action call", fragment=_source_of(node))
    func = _func_name(node.func, modules)
    if len(node.args) + len(node.keywords) > MAX_ELEMENTS:
        raise ParseError(f"an action takes at most {MAX_ELEMENTS} arguments")
    args = tuple(literal(a) for a in node.args)
    kwargs: dict[str, Value] = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ParseError("**kwargs unpacking is not allowed", fragment=_source_of(kw.value))
        if kw.arg in kwargs:
            # Python's compiler refuses this (ast.parse does not): never let the last one win.
            raise ParseError(f"keyword argument repeated: {kw.arg}")
        kwargs[kw.arg] = literal(kw.value)
    return Call(func=func, args=args, kwargs=kwargs, lineno=getattr(node, "lineno", 1))


def _syntax_error(exc: SyntaxError | ValueError, src: str) -> ParseError:
    if isinstance(exc, SyntaxError):
        where = f" on line {exc.lineno}" if exc.lineno and "\n" in src.strip() else ""
        return ParseError(f"invalid syntax{where}: {exc.msg}")
    return ParseError(f"invalid syntax: {exc}")


def parse_expression(src: str) -> ast.expr:
    """Parses ``src`` as one expression (syntax only; :func:`call_from_node` whitelists it)."""
    if len(src) > MAX_SOURCE:
        raise ParseError(f"an action may be at most {MAX_SOURCE} characters long")
    try:
        tree = ast.parse(src, mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise _syntax_error(exc, src) from None
    except (RecursionError, MemoryError):
        raise ParseError("the action is nested too deeply to read") from None
    return tree.body


def parse_module(src: str) -> ast.Module:
    """Parses ``src`` as statements (for pyautogui code); the caller whitelists them."""
    if len(src) > MAX_SOURCE:
        raise ParseError(f"the code may be at most {MAX_SOURCE} characters long")
    try:
        return ast.parse(src, mode="exec")
    except (SyntaxError, ValueError) as exc:
        raise _syntax_error(exc, src) from None
    except (RecursionError, MemoryError):
        raise ParseError("the code is nested too deeply to read") from None
