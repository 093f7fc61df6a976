"""Text to IR: the Lark LALR parser for .monet files, its error messages, and the builder.

Parsing happens in two steps. Lark (LALR, contextual lexer, an indentation post-lexer)
turns the text into *raw statements* through :class:`_ToRaw`, a Transformer run inline
with the parser, so no parse tree is built. The builder then resolves names, attaches
implementations and backward ops to their ops, computes sizes and collects every
semantic problem it finds as a located :class:`~monetdsl.errors.Diagnostic`.

Example::

    >>> from monetdsl.grammar.parser import parse_spec
    >>> spec = parse_spec('''
    ... network tiny
    ...   tensor x f32[4] input
    ...   op a (x) -> y f32[4] time 1us
    ...     backward reads (grad(y)) -> grad(x) time 2us
    ...   output y
    ... ''')
    >>> [op.name for op in spec.network.backward_ops]
    ['a.backward']
"""
from __future__ import annotations

import ast
import functools
import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path

from lark import Lark, Token, Transformer
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError
from lark.indenter import Indenter

from ..errors import Diagnostic, SpecError, SpecSyntaxError
from ..ir import (
    BackwardImpl,
    BackwardOp,
    Constraints,
    FixedItem,
    ForwardImpl,
    ForwardOp,
    ImplPin,
    Network,
    Pattern,
    Schedule,
    Spec,
    StagePlan,
    Tensor,
    TensorKind,
    grad_name,
    shape_bytes,
)
from ..io import read_input
from ..units import MAX_BYTES, UnitError, parse_bytes, parse_fraction, parse_time_us

__all__ = ["Document", "parse_document", "parse_spec", "load_spec", "parse_schedule", "load_schedule", "read_text"]


# --------------------------------------------------------------------------- lexing
class _Indentation(Indenter):
    """Python-style INDENT/DEDENT tokens, with located errors for inconsistent dedents."""

    NL_type = "_NL"
    OPEN_PAREN_types = ["LPAR"]
    CLOSE_PAREN_types = ["RPAR"]
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 8

    def handle_NL(self, token: Token):  # noqa: N802 - Lark's naming
        if self.paren_level > 0:
            return
        yield token
        indent_str = token.rsplit("\n", 1)[1] if "\n" in token else ""
        indent = indent_str.count(" ") + indent_str.count("\t") * self.tab_len
        line = (token.end_line or token.line) if "\n" in token else token.line
        if indent > self.indent_level[-1]:
            self.indent_level.append(indent)
            yield Token("_INDENT", indent_str, line=line, column=indent + 1)
        else:
            while indent < self.indent_level[-1]:
                self.indent_level.pop()
                yield Token("_DEDENT", indent_str, line=line, column=indent + 1)
            if indent != self.indent_level[-1]:
                raise _BadDedent(line, indent + 1, self.indent_level[-1])


class _BadDedent(Exception):
    def __init__(self, line: int, column: int, expected: int):
        super().__init__(line, column, expected)
        self.line, self.column, self.expected = line, column, expected


class _BadString(Exception):
    """A quoted name or path whose escapes do not decode (``"\\x"``, a NUL byte)."""

    def __init__(self, line: int, column: int, reason: str):
        super().__init__(line, column, reason)
        self.line, self.column, self.reason = line, column, reason


def _unquote(text: str, line: int, column: int) -> str:
    """The text a quoted string stands for (the printer writes JSON's escapes)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        reason = getattr(exc, "msg", None) or str(exc)
        shown = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text[:40]) + ("..." if len(text) > 40 else "")
        raise _BadString(line, column, f"cannot read the quoted text {shown}: {reason}") from None


# --------------------------------------------------------------------------- raw statements
class Ident(str):
    """A name with the position it was written at (so errors can point at it)."""

    line: int
    column: int
    grad_of: str | None

    def __new__(cls, value: str, line: int = 0, column: int = 0, grad_of: str | None = None):
        obj = super().__new__(cls, value)
        obj.line, obj.column, obj.grad_of = line, column, grad_of
        return obj


@dataclass
class _Attr:
    kind: str
    value: object
    line: int
    column: int


@dataclass
class _Type:
    dtype: str | None
    shape: tuple[int, ...] | None
    size: Token | None
    line: int
    column: int


@dataclass
class _Out:
    ref: Ident
    type: _Type | None
    view_of: Ident | None


@dataclass
class _Impl:
    name: Ident
    attrs: list[_Attr]


@dataclass
class _Backward:
    name: Ident | None
    attrs: list[_Attr]
    impls: list[_Impl]
    line: int
    column: int


@dataclass
class _Op:
    name: Ident
    inputs: list[Ident]
    outputs: list[_Out]
    attrs: list[_Attr]
    impls: list[_Impl] = field(default_factory=list)
    backwards: list[_Backward] = field(default_factory=list)


@dataclass
class _TensorStmt:
    name: Ident
    type: _Type | None
    view_of: Ident | None
    kind: Token | None


@dataclass
class _Fixed:
    name: Ident
    size: Token


@dataclass
class _Outputs:
    names: list[Ident]


@dataclass
class _RawNetwork:
    name: Ident
    items: list


@dataclass
class _Clause:
    kind: str
    names: list[Ident]


@dataclass
class _RawStage:
    head: Ident | None  # None for the forward block
    clauses: list[_Clause]
    line: int


@dataclass
class _RawSchedule:
    spec_path: Token
    fingerprint: Token
    items: list
    line: int = 0


def _tok_ident(tok: Token) -> Ident:
    value = str(tok)
    if tok.type == "STRING":
        value = _unquote(value, tok.line or 0, tok.column or 0)
    return Ident(value, tok.line or 0, tok.column or 0)


class _ToRaw(Transformer):
    """Lark callbacks: tokens and rules to raw statements (no semantic checks here)."""

    def name(self, children):
        return _tok_ident(children[0])

    def tref(self, children):
        return children[0]

    def grad_ref(self, children):
        tok = children[0]
        inner = str(tok)[len("grad(") : -1].strip()
        base = _unquote(inner, tok.line, tok.column) if inner.startswith('"') else inner
        return Ident(grad_name(base), tok.line, tok.column, grad_of=base)

    def pattern(self, children):
        return _tok_ident(children[0])

    def shaped_type(self, children):
        tok = children[0]
        dtype, _, dims = str(tok).partition("[")
        shape = tuple(int(d) for d in dims.rstrip("]").split(",") if d.strip())
        size = children[1] if len(children) > 1 else None
        return _Type(dtype, shape, size, tok.line, tok.column)

    def sized_type(self, children):
        tok = children[0]
        return _Type(None, None, tok, tok.line, tok.column)

    def view_of(self, children):
        return ("view", children[0])

    def out_decl(self, children):
        ref = children[0]
        type_ = next((c for c in children[1:] if isinstance(c, _Type)), None)
        view = next((c[1] for c in children[1:] if isinstance(c, tuple)), None)
        return _Out(ref, type_, view)

    # attributes -----------------------------------------------------------
    def _attr(kind):  # noqa: N805 - factory used in the class body
        def build(self, children):
            first = children[0] if children else None
            line = getattr(first, "line", 0) or 0
            column = getattr(first, "column", 0) or 0
            value = children[0] if len(children) == 1 and kind not in ("reads", "recompute_reads", "outputs", "accumulates") else children
            return _Attr(kind, value, line, column)

        return build

    time_attr = _attr("time")
    workspace_attr = _attr("workspace")
    overwrites_attr = _attr("overwrites")
    recompute_time_attr = _attr("recompute_time")
    recompute_reads_attr = _attr("recompute_reads")
    reads_attr = _attr("reads")
    accumulates_attr = _attr("accumulates")
    outputs_attr = _attr("outputs")
    del _attr

    # network --------------------------------------------------------------
    def impl_line(self, children):
        return _Impl(children[0], list(children[1:]))

    def backward_line(self, children):
        keyword = children[0]
        name = children[1] if len(children) > 1 and isinstance(children[1], Ident) else None
        attrs = [c for c in children if isinstance(c, _Attr)]
        return (keyword, name, attrs)

    def backward_block(self, children):
        (keyword, name, attrs), impls = children[0], list(children[1:])
        return _Backward(name, attrs, impls, keyword.line, keyword.column)

    def op_line(self, children):
        name = children[0]
        inputs = [c for c in children[1:] if isinstance(c, Ident)]
        outputs = [c for c in children[1:] if isinstance(c, _Out)]
        attrs = [c for c in children[1:] if isinstance(c, _Attr)]
        return _Op(name, inputs, outputs, attrs)

    def op_block(self, children):
        op = children[0]
        for child in children[1:]:
            if isinstance(child, _Impl):
                op.impls.append(child)
            else:
                op.backwards.append(child)
        return op

    def fixed_stmt(self, children):
        return _Fixed(children[0], children[1])

    def tensor_stmt(self, children):
        name = children[0]
        type_ = next((c for c in children[1:] if isinstance(c, _Type)), None)
        view = next((c[1] for c in children[1:] if isinstance(c, tuple)), None)
        kind = next((c for c in children[1:] if isinstance(c, Token) and c.type == "KIND"), None)
        return _TensorStmt(name, type_, view, kind)

    def output_stmt(self, children):
        return _Outputs(list(children))

    def network(self, children):
        return _RawNetwork(children[0], list(children[1:]))

    # constraints ----------------------------------------------------------
    def memory_limit(self, children):
        return ("memory", children[0])

    def overhead_limit(self, children):
        return ("overhead", children[0])

    def keep_pin(self, children):
        return ("keep", list(children))

    def never_recompute_pin(self, children):
        return ("never_recompute", list(children))

    def impl_is(self, children):
        return ("impl", children[0], [children[1]])

    def impl_in(self, children):
        return ("impl", children[0], list(children[1:]))

    def constraints(self, children):
        return ("constraints", list(children))

    # schedules ------------------------------------------------------------
    def impl_choice(self, children):
        return ("impl", children[0], children[1])

    def recompute_clause(self, children):
        return _Clause("recompute", list(children))

    def keep_clause(self, children):
        return _Clause("keep", list(children))

    def free_clause(self, children):
        return _Clause("free", list(children))

    def clause_line(self, children):
        return list(children)

    def _stage(self, head, children, line):
        clauses: list[_Clause] = []
        for child in children:
            clauses.extend(child if isinstance(child, list) else [child])
        return _RawStage(head, clauses, line)

    def forward_block(self, children):
        return self._stage(None, children[1:], children[0].line)

    def stage_block(self, children):
        return self._stage(children[0], children[1:], children[0].line)

    def schedule(self, children):
        return _RawSchedule(children[1], children[2], list(children[3:]), children[0].line)

    def start(self, children):
        return list(children)


# --------------------------------------------------------------------------- parser
@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    grammar = importlib.resources.files(__package__).joinpath("monet.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        lexer="contextual",
        postlex=_Indentation(),
        transformer=_ToRaw(),
        maybe_placeholders=False,
    )


_FRIENDLY = {
    "NAME": "a name",
    "STRING": 'a quoted name ("...")',
    "PATTERN": "a name or glob pattern",
    "QUANTITY": "a quantity with a unit (e.g. 40us, 8MiB, 10%)",
    "HEX": "a hexadecimal fingerprint",
    "SHAPED": "a dtype with a shape (e.g. f32[8,16])",
    "GRAD_REF": "a gradient (grad(NAME))",
    "KIND": "a tensor kind (input, param, buffer, activation, gradient)",
    "_NL": "end of line",
    "_INDENT": "an indented line",
    "_DEDENT": "a line with less indentation",
    "$END": "end of file",
}


def _describe_terminal(name: str) -> str:
    if name in _FRIENDLY:
        return _FRIENDLY[name]
    try:
        pattern = _lark().get_terminal(name).pattern
    except KeyError:
        return name
    if pattern.type == "str":
        return repr(pattern.value)
    return name


def _describe_token(token: Token) -> str:
    if token.type == "_NL":
        return "end of line"
    if token.type == "_INDENT":
        return "indentation"
    if token.type == "_DEDENT":
        return "end of the indented block"
    if token.type == "$END":
        return "end of file"
    return repr(str(token))


def _syntax_diagnostic(exc: UnexpectedInput, text: str, path: str) -> Diagnostic:
    line = getattr(exc, "line", 0) or 0
    column = getattr(exc, "column", 0) or 0
    lines = text.splitlines()
    if isinstance(exc, UnexpectedToken):
        token = exc.token
        expected = sorted({_describe_terminal(t) for t in exc.accepts or exc.expected})
        if token.type == "_NL" and "\n" in token:
            # point at the end of the line that stopped short, not at the next line
            line = token.line or line
            column = token.column or column
        message = f"unexpected {_describe_token(token)}"
        if token.type == "_INDENT":
            message = "unexpected indentation (only implementations, backward ops and stage clauses are indented)"
        if expected:
            message += "; expected " + _join_or(expected)
    elif isinstance(exc, UnexpectedCharacters):
        char = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else ""
        allowed = sorted({_describe_terminal(t) for t in (exc.allowed or ())})
        message = f"unexpected character {char!r}"
        if allowed:
            message += "; expected " + _join_or(allowed)
    elif isinstance(exc, UnexpectedEOF):
        message = "unexpected end of file"
        expected = sorted({_describe_terminal(t) for t in exc.expected})
        if expected:
            message += "; expected " + _join_or(expected)
        line = max(len(lines), 1)
        column = len(lines[-1]) + 1 if lines else 1
    else:  # pragma: no cover - Lark has no other subclass
        message = str(exc)
    source_line = lines[line - 1] if 0 < line <= len(lines) else None
    opened = _unclosed_bracket(source_line or "")
    if opened is not None and _DTYPE_BEFORE.search(source_line[: opened - 1]):
        # an unclosed shape: the parser only notices later, at some word it did not expect
        message = "'[' is never closed on this line; a shape reads f32[8,16]"
        column = opened
    return Diagnostic(message, path, line, column, source_line)


_DTYPE_BEFORE = re.compile(r"(?<![A-Za-z0-9_])(bool|(bf|tf|f|c|i|u)[0-9][0-9a-z]*)$")


def _unclosed_bracket(line: str) -> int | None:
    """The 1-based column of the last '[' with no ']' after it (comments and quoted text
    aside), or None."""
    depth_open: list[int] = []
    quoted = False
    for index, char in enumerate(line):
        if char == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif char == "#":
            break
        elif char == "[":
            depth_open.append(index + 1)
        elif char == "]" and depth_open:
            depth_open.pop()
    return depth_open[-1] if depth_open else None


def _join_or(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) > 8:
        items = items[:8] + ["..."]
    return ", ".join(items[:-1]) + " or " + items[-1]


@dataclass
class Document:
    """Everything one .monet file holds: any of a network, constraints and a schedule."""

    network: Network | None = None
    constraints: Constraints | None = None
    schedule: Schedule | None = None
    path: str = "<input>"
    source: str = ""


def parse_document(text: str, path: str = "<input>") -> Document:
    """Parse ``text`` into a :class:`Document`; raise :class:`MonetError` on any problem."""
    source = text if text.endswith("\n") else text + "\n"
    try:
        sections = _lark().parse(source)
    except _BadDedent as exc:
        lines = source.splitlines()
        raise SpecSyntaxError(
            Diagnostic(
                f"indentation does not match any outer level (expected column {exc.expected + 1})",
                path,
                exc.line,
                exc.column,
                lines[exc.line - 1] if 0 < exc.line <= len(lines) else None,
            )
        ) from None
    except UnexpectedInput as exc:
        raise SpecSyntaxError(_syntax_diagnostic(exc, source, path)) from None
    except _BadString as bad:  # raised while parsing: the transformer runs inside the LALR parser
        lines = source.splitlines()
        source_line = lines[bad.line - 1] if 0 < bad.line <= len(lines) else None
        raise SpecSyntaxError(Diagnostic(bad.reason, path, bad.line, bad.column, source_line)) from None
    except VisitError as exc:  # pragma: no cover - transformer bugs surface as VisitError
        raise exc.orig_exc from None
    builder = _Builder(path, source)
    doc = Document(path=path, source=source)
    for section in sections:
        if isinstance(section, _RawNetwork):
            if doc.network is not None:
                builder.error("a file may hold only one network", section.name)
                continue
            doc.network = builder.network(section)
        elif isinstance(section, _RawSchedule):
            if doc.schedule is not None:
                builder.error("a file may hold only one schedule", section.spec_path)
                continue
            doc.schedule = builder.schedule(section)
        else:
            if doc.constraints is not None:
                builder.error("a file may hold only one constraints section", None)
                continue
            doc.constraints = builder.constraints(section[1])
    builder.raise_if_errors()
    return doc


def read_text(path: str | Path) -> str:
    """Read a file for parsing; a missing or unreadable file (or a FIFO) is a user error, not a crash."""
    return read_input(path)


def parse_spec(text: str, path: str = "<input>") -> Spec:
    """Parse and validate a spec (a network and optional constraints)."""
    from ..validate import validate_spec

    doc = parse_document(text, path)
    if doc.network is None:
        hint = " (this looks like a schedule; pass it with --schedule)" if doc.schedule is not None else ""
        first = doc.source.splitlines()[0] if doc.source.strip() else None
        raise SpecError(Diagnostic(f"no network section in this file{hint}", path, 1, 1, first))
    if doc.schedule is not None:
        raise SpecError(Diagnostic("a spec file holds no schedule; keep schedules in their own file", path))
    spec = Spec(doc.network, doc.constraints or Constraints(), path, doc.source)
    validate_spec(spec)
    return spec


def load_spec(path: str | Path) -> Spec:
    """Read, parse and validate the spec file at ``path``."""
    return parse_spec(read_text(path), str(path))


def parse_schedule(text: str, path: str = "<schedule>") -> Schedule:
    """Parse a schedule file (checked against its spec later, by the simulator)."""
    doc = parse_document(text, path)
    if doc.schedule is None:
        raise SpecError(Diagnostic("no schedule section in this file", path, 1, 1))
    if doc.network is not None or doc.constraints is not None:
        raise SpecError(Diagnostic("a schedule file holds only a schedule section", path))
    return doc.schedule


def load_schedule(path: str | Path) -> Schedule:
    return parse_schedule(read_text(path), str(path))


# --------------------------------------------------------------------------- builder
_TENSOR_KINDS = {kind.value: kind for kind in TensorKind}


class _Invalid:
    """A quantity that failed to parse (already reported): suppresses follow-on errors."""

    def __bool__(self) -> bool:
        return False


_INVALID = _Invalid()


class _Builder:
    """Raw statements to IR, collecting located diagnostics instead of stopping at the first."""

    def __init__(self, path: str, source: str):
        self.path = path
        self.lines = source.splitlines()
        self.diagnostics: list[Diagnostic] = []

    # diagnostics -------------------------------------------------------------
    def error(self, message: str, where) -> None:
        line = getattr(where, "line", 0) or 0
        column = getattr(where, "column", 0) or 0
        source_line = self.lines[line - 1] if 0 < line <= len(self.lines) else None
        self.diagnostics.append(Diagnostic(message, self.path, line, column, source_line))

    def raise_if_errors(self) -> None:
        if self.diagnostics:
            raise SpecError(self.diagnostics)

    def _quantity(self, tok: Token, parse, what: str):
        try:
            return parse(str(tok))
        except UnitError as exc:
            text = str(tok).strip()
            if text and text[-1].isdigit():
                example = "40us" if parse is parse_time_us else "8MiB"
                self.error(f"{what}: {text} has no unit (write e.g. {example})", tok)
            else:
                self.error(f"{what}: {exc}", tok)
            return _INVALID

    def _bytes(self, tok: Token, what: str) -> int | None:
        return self._quantity(tok, parse_bytes, what)

    def _time(self, tok: Token, what: str) -> float | None:
        return self._quantity(tok, parse_time_us, what)

    # tensors -----------------------------------------------------------------
    def _type_bytes(self, name: Ident, type_: _Type) -> tuple[int, str | None, tuple[int, ...] | None]:
        if type_.dtype is None:
            nbytes = self._bytes(type_.size, f"size of {name}")
            return (nbytes or 0), None, None
        nbytes = shape_bytes(type_.dtype, type_.shape)
        if nbytes > MAX_BYTES:
            self.error(f"{name} {type_.dtype}[{','.join(map(str, type_.shape))}] has {nbytes} bytes, more than monetdsl can"
                       f" count ({MAX_BYTES} B, 8 EiB)", name)
            return 0, type_.dtype, type_.shape
        if type_.size is not None:
            given = self._bytes(type_.size, f"size of {name}")
            if given is not None and given != nbytes:
                self.error(
                    f"size of {name} does not match its shape: {type_.dtype}"
                    f"[{','.join(map(str, type_.shape))}] is {nbytes} bytes but {str(type_.size).strip()} was given",
                    type_.size,
                )
        return nbytes, type_.dtype, type_.shape

    def network(self, raw: _RawNetwork) -> Network:
        decls: dict[str, dict] = {}
        fixed: list[FixedItem] = []
        outputs: list[Ident] = []
        forward_ops: list[ForwardOp] = []
        backward_ops: list[BackwardOp] = []
        top_level_backward: list[BackwardOp] = []  # canonical order: attached ops first
        op_lines: dict[str, Ident] = {}

        def declare(name: Ident, kind: TensorKind, type_: _Type | None, view: Ident | None, binding: str) -> None:
            if name.grad_of is not None:
                if type_ is not None or view is not None:
                    self.error(f"{name} takes the size of {name.grad_of}; do not give it a type", name)
                return
            previous = decls.get(name)
            if previous is not None:
                if type_ is None and view is None and previous["binding"] == "tensor":
                    previous["binding"] = binding  # an op produces a tensor declared earlier
                    if kind is TensorKind.GRADIENT and previous["kind"] is TensorKind.ACTIVATION and previous["explicit_kind"] is False:
                        previous["kind"] = kind
                    return
                if type_ is None and view is None:
                    return  # a plain reference; producers are checked by the validator
                self.error(f"tensor {name} is declared twice (first at line {previous['name'].line})", name)
                return
            if type_ is None and view is None:
                return  # reference to a tensor declared elsewhere (checked below)
            decls[name] = {"name": name, "kind": kind, "type": type_, "view": view, "binding": binding, "explicit_kind": True}

        # pass 1: declarations --------------------------------------------------
        for item in raw.items:
            if isinstance(item, _TensorStmt):
                kind = _TENSOR_KINDS[str(item.kind)] if item.kind is not None else TensorKind.ACTIVATION
                if item.type is None and item.view_of is None:
                    self.error(f"tensor {item.name} needs a type (e.g. f32[8,16]) or a size (e.g. 4KiB)", item.name)
                    continue
                if item.name in decls:
                    self.error(f"tensor {item.name} is declared twice (first at line {decls[item.name]['name'].line})", item.name)
                    continue
                decls[item.name] = {
                    "name": item.name,
                    "kind": kind,
                    "type": item.type,
                    "view": item.view_of,
                    "binding": "tensor",
                    "explicit_kind": item.kind is not None,
                }
            elif isinstance(item, _Op):
                for out in item.outputs:
                    declare(out.ref, TensorKind.ACTIVATION, out.type, out.view_of, "op")
                for impl in item.impls:
                    for attr in impl.attrs:
                        if attr.kind == "outputs":
                            for out in attr.value:
                                declare(out.ref, TensorKind.ACTIVATION, out.type, out.view_of, "derived")
                for bwd in item.backwards:
                    self._declare_backward_outputs(bwd, declare)
            elif isinstance(item, _Backward):
                self._declare_backward_outputs(item, declare)

        # sizes (views need their base, so resolve lazily) ----------------------------
        tensors: dict[str, Tensor] = {}

        def resolve(name: str, stack: tuple[str, ...] = ()) -> Tensor | None:
            if name in tensors:
                return tensors[name]
            info = decls.get(name)
            if info is None:
                return None
            ident: Ident = info["name"]
            type_: _Type | None = info["type"]
            view: Ident | None = info["view"]
            base = None
            if view is not None:
                if view in stack or view == name:
                    self.error(f"view {name} is (indirectly) a view of itself", view)
                    return None
                base = resolve(view, stack + (name,))
                if base is None:
                    if view not in decls:
                        self.error(f"{name} is a view of {view}, which is not a tensor", view)
                    return None
            if type_ is not None:
                nbytes, dtype, shape = self._type_bytes(ident, type_)
            else:
                nbytes, dtype, shape = base.nbytes, base.dtype, base.shape
            if base is not None and nbytes > _storage_size(base, tensors):
                self.error(
                    f"view {name} ({nbytes} bytes) is larger than the storage of {view} ({_storage_size(base, tensors)} bytes)",
                    ident,
                )
            tensor = Tensor(str(name), info["kind"], nbytes, dtype, shape, str(view) if view else None, None, ident.line)
            tensors[str(name)] = tensor
            return tensor

        for name in list(decls):
            resolve(name)

        def need(ref: Ident, what: str) -> bool:
            """A reference must name a tensor; create grad(x) tensors on first use.

            ``what`` is the phrase that leads the message, e.g. "op b reads"."""
            if ref.grad_of is not None:
                base = tensors.get(ref.grad_of)
                if base is None:
                    if ref.grad_of not in decls:
                        self.error(f"{what} {ref}, but there is no tensor {ref.grad_of}", ref)
                    return False
                if str(ref) not in tensors:
                    tensors[str(ref)] = Tensor(
                        str(ref), TensorKind.GRADIENT, base.nbytes, base.dtype, base.shape, None, ref.grad_of, ref.line
                    )
                return True
            if str(ref) not in tensors:
                if ref not in decls:
                    if what.endswith(" produces"):
                        self.error(f"{what} {ref} without a type: write e.g. `{ref} f32[8,16]` or `{ref} 4KiB`", ref)
                    else:
                        self.error(f"{what} {ref}, but no tensor of that name is declared or produced", ref)
                return False
            return True

        # pass 2: ops ---------------------------------------------------------------
        for item in raw.items:
            if isinstance(item, _Fixed):
                nbytes = self._bytes(item.size, f"fixed {item.name}")
                if any(f.name == item.name for f in fixed):
                    self.error(f"fixed memory {item.name} is declared twice", item.name)
                elif nbytes is not None:
                    fixed.append(FixedItem(str(item.name), nbytes, item.name.line))
            elif isinstance(item, _Outputs):
                outputs.extend(item.names)
            elif isinstance(item, _Op):
                op = self._forward_op(item, need)
                if op is not None:
                    self._register_op(op.name, item.name, op_lines)
                    forward_ops.append(op)
                for bwd in item.backwards:
                    bop = self._backward_op(bwd, item.name, need)
                    if bop is not None:
                        self._register_op(bop.name, bwd.name or item.name, op_lines)
                        backward_ops.append(bop)
            elif isinstance(item, _Backward):
                bop = self._backward_op(item, None, need)
                if bop is not None:
                    self._register_op(bop.name, item.name, op_lines)
                    top_level_backward.append(bop)

        for out in outputs:
            need(out, "the network outputs")
        seen_outputs: set[str] = set()
        for out in outputs:
            if out in seen_outputs:
                self.error(f"output {out} is listed twice", out)
            seen_outputs.add(out)

        return Network(
            str(raw.name), tensors, tuple(forward_ops), tuple(backward_ops + top_level_backward), tuple(str(o) for o in outputs), tuple(fixed), raw.name.line
        )

    def _declare_backward_outputs(self, bwd: _Backward, declare) -> None:
        for attr in bwd.attrs:
            if attr.kind == "outputs":
                for out in attr.value:
                    declare(out.ref, TensorKind.GRADIENT, out.type, out.view_of, "backward")

    def _register_op(self, name: str, where: Ident, op_lines: dict[str, Ident]) -> None:
        if name in op_lines:
            self.error(f"operator {name} is declared twice (first at line {op_lines[name].line})", where)
        else:
            op_lines[name] = where

    def _forward_op(self, raw: _Op, need) -> ForwardOp | None:
        ok = True
        for ref in raw.inputs:
            ok &= need(ref, f"op {raw.name} reads")
        for out in raw.outputs:
            ok &= need(out.ref, f"op {raw.name} produces")
            if out.ref.grad_of is not None:
                self.error(f"forward op {raw.name} cannot produce a gradient ({out.ref})", out.ref)
                ok = False
        if not raw.outputs:  # pragma: no cover - the grammar requires one
            self.error(f"op {raw.name} has no outputs", raw.name)
            return None
        defaults = {"time": None, "workspace": 0, "recompute_time": None, "recompute_reads": ()}
        for attr in raw.attrs:
            if attr.kind in ("overwrites", "outputs"):
                what = "in-place overwrites" if attr.kind == "overwrites" else "extra outputs (derived tensors)"
                self.error(f"{what} belong on an impl line under op {raw.name}", attr)
                ok = False
            elif attr.kind == "reads":
                self.error(f"reads (...) describes backward ops; op {raw.name} reads its inputs (...)", attr)
                ok = False
            else:
                ok = self._apply_common_attr(defaults, attr, str(raw.name)) and ok
        impls: list[ForwardImpl] = []
        raw_impls = raw.impls or [_Impl(Ident("default", raw.name.line, raw.name.column), [])]
        names_seen: set[str] = set()
        for raw_impl in raw_impls:
            if raw_impl.name in names_seen:
                self.error(f"op {raw.name} has two implementations called {raw_impl.name}", raw_impl.name)
                ok = False
                continue
            names_seen.add(raw_impl.name)
            values = dict(defaults)
            overwrites = None
            derived: list[str] = []
            for attr in raw_impl.attrs:
                if attr.kind == "overwrites":
                    if attr.value.grad_of is not None:
                        self.error(f"impl {raw_impl.name} of forward op {raw.name} cannot overwrite a gradient ({attr.value})", attr.value)
                        ok = False
                    overwrites = attr.value
                elif attr.kind == "outputs":
                    for out in attr.value:
                        if out.ref.grad_of is not None:
                            self.error(f"impl {raw_impl.name} of {raw.name} cannot produce a gradient", out.ref)
                            ok = False
                        elif need(out.ref, f"impl {raw_impl.name} of {raw.name} produces"):
                            derived.append(str(out.ref))
                elif attr.kind == "reads":
                    self.error(
                        f"reads (...) describes backward implementations; impl {raw_impl.name} of forward op {raw.name}"
                        " cannot have it",
                        attr,
                    )
                    ok = False
                else:
                    ok = self._apply_common_attr(values, attr, f"{raw.name} impl {raw_impl.name}") and ok
            if values["time"] is None or values["time"] is _INVALID:
                if values["time"] is None:
                    self.error(f"op {raw.name} impl {raw_impl.name} has no time (add e.g. `time 10us`)", raw_impl.name)
                ok = False
                continue
            if values["recompute_time"] is _INVALID:
                ok = False
                continue
            for ref in values["recompute_reads"]:
                ok &= need(ref, f"recomputing {raw.name} reads")
            impls.append(
                ForwardImpl(
                    str(raw_impl.name),
                    values["time"],
                    values["workspace"],
                    str(overwrites) if overwrites is not None else None,
                    tuple(derived),
                    values["recompute_time"],
                    frozenset(str(r) for r in values["recompute_reads"]),
                    raw_impl.name.line,
                )
            )
        if not ok:
            return None
        return ForwardOp(
            str(raw.name),
            tuple(str(r) for r in raw.inputs),
            tuple(str(o.ref) for o in raw.outputs),
            tuple(impls),
            raw.name.line,
        )

    def _apply_common_attr(self, values: dict, attr: _Attr, owner: str) -> bool:
        """Apply an attribute a forward op or implementation may have; False (and an error)
        for one it may not, such as ``accumulates``, which describes backward implementations."""
        if attr.kind == "time":
            values["time"] = self._time(attr.value, f"time of {owner}")
        elif attr.kind == "workspace":
            values["workspace"] = self._bytes(attr.value, f"workspace of {owner}") or 0
        elif attr.kind == "recompute_time":
            values["recompute_time"] = self._time(attr.value, f"recompute time of {owner}")
        elif attr.kind == "recompute_reads":
            values["recompute_reads"] = tuple(values["recompute_reads"]) + tuple(attr.value)
        else:
            self.error(f"{attr.kind.replace('_', ' ')} is not an attribute of a forward op ({owner})", attr)
            return False
        return True

    def _backward_op(self, raw: _Backward, parent: Ident | None, need) -> BackwardOp | None:
        if parent is None and raw.name is None:
            self.error("a backward op outside an op needs a name (e.g. `backward grad_a reads (...)`)", raw)
            return None
        local = raw.name if raw.name is not None else Ident("backward", raw.line, raw.column)
        full = f"{parent}.{local}" if parent is not None else str(local)
        where = raw.name if raw.name is not None else parent
        ok = True
        common_reads: list[Ident] = []
        outputs: list[Ident] = []
        defaults = {"time": None, "workspace": 0, "accumulates": (), "overwrites": None}
        for attr in raw.attrs:
            if attr.kind == "reads":
                common_reads.extend(attr.value)
            elif attr.kind == "accumulates":
                defaults["accumulates"] = tuple(attr.value)
            elif attr.kind == "overwrites":
                defaults["overwrites"] = attr.value
            elif attr.kind == "outputs":
                outputs.extend(out.ref for out in attr.value)
            elif attr.kind == "time":
                defaults["time"] = self._time(attr.value, f"time of {full}")
            elif attr.kind == "workspace":
                defaults["workspace"] = self._bytes(attr.value, f"workspace of {full}") or 0
            else:
                self.error(f"{attr.kind.replace('_', ' ')} is not an attribute of backward op {full}", attr)
                ok = False
        if not outputs:
            self.error(f"backward op {full} produces nothing: add `-> grad(x)` (the gradients it computes)", where)
            ok = False
        for ref in outputs:
            ok &= need(ref, f"backward op {full} produces")
        for ref in common_reads:
            ok &= need(ref, f"backward op {full} reads")
        impls: list[BackwardImpl] = []
        raw_impls = raw.impls or [_Impl(Ident("default", raw.line or where.line, raw.column or where.column), [])]
        names_seen: set[str] = set()
        for raw_impl in raw_impls:
            if raw_impl.name in names_seen:
                self.error(f"backward op {full} has two implementations called {raw_impl.name}", raw_impl.name)
                ok = False
                continue
            names_seen.add(raw_impl.name)
            values = dict(defaults)
            reads = list(common_reads)
            for attr in raw_impl.attrs:
                if attr.kind == "reads":
                    for ref in attr.value:
                        ok &= need(ref, f"backward op {full} (impl {raw_impl.name}) reads")
                    reads.extend(attr.value)
                elif attr.kind == "time":
                    values["time"] = self._time(attr.value, f"time of {full} impl {raw_impl.name}")
                elif attr.kind == "workspace":
                    values["workspace"] = self._bytes(attr.value, f"workspace of {full} impl {raw_impl.name}") or 0
                elif attr.kind == "accumulates":
                    values["accumulates"] = tuple(attr.value)
                elif attr.kind == "overwrites":
                    values["overwrites"] = attr.value
                else:
                    self.error(
                        f"{attr.kind.replace('_', ' ')} is not an attribute of a backward implementation ({full} impl {raw_impl.name})",
                        attr,
                    )
                    ok = False
            if values["time"] is None or values["time"] is _INVALID:
                if values["time"] is None:
                    self.error(f"backward op {full} impl {raw_impl.name} has no time (add e.g. `time 10us`)", raw_impl.name)
                ok = False
                continue
            for ref in values["accumulates"]:
                if ref not in outputs:
                    self.error(f"backward op {full} (impl {raw_impl.name}) accumulates {ref}, which the op does not produce", ref)
                    ok = False
            target = values["overwrites"]
            if target is not None and target not in reads:
                self.error(f"backward op {full} (impl {raw_impl.name}) overwrites {target}, which it does not read", target)
                ok = False
            impls.append(BackwardImpl(str(raw_impl.name), frozenset(str(r) for r in reads), values["time"], values["workspace"],
                                      raw_impl.name.line, frozenset(str(r) for r in values["accumulates"]),
                                      str(target) if target is not None else None))
        if not ok:
            return None
        return BackwardOp(full, tuple(str(o) for o in outputs), tuple(impls), str(parent) if parent is not None else None, raw.line or where.line)

    # constraints ---------------------------------------------------------------------
    def constraints(self, items: list) -> Constraints:
        result = Constraints()
        keep: list[Pattern] = []
        never: list[Pattern] = []
        pins: list[ImplPin] = []
        for item in items:
            kind = item[0]
            if kind == "memory":
                if result.memory_budget is not None:
                    self.error("memory limit given twice", item[1])
                result.memory_budget = self._bytes(item[1], "memory limit")
            elif kind == "overhead":
                if result.max_overhead is not None:
                    self.error("overhead limit given twice", item[1])
                try:
                    result.max_overhead = parse_fraction(str(item[1]))
                except UnitError as exc:
                    self.error(f"overhead limit: {exc}", item[1])
            elif kind == "keep":
                keep.extend(Pattern(str(p), p.line) for p in item[1])
            elif kind == "never_recompute":
                never.extend(Pattern(str(p), p.line) for p in item[1])
            else:
                pattern = item[1]
                pins.append(ImplPin(Pattern(str(pattern), pattern.line), tuple(str(n) for n in item[2])))
        result.keep, result.never_recompute, result.impls = tuple(keep), tuple(never), tuple(pins)
        return result

    # schedules -----------------------------------------------------------------------
    def schedule(self, raw: _RawSchedule) -> Schedule:
        impls: dict[str, str] = {}
        impl_lines: dict[str, int] = {}
        forward_keep: list[str] = []
        forward_line = 0
        stages: list[StagePlan] = []
        seen_forward = False
        for item in raw.items:
            if isinstance(item, tuple):
                _, op, impl = item
                if op in impls:
                    self.error(f"implementation of {op} chosen twice", op)
                impls[str(op)] = str(impl)
                impl_lines[str(op)] = op.line
            elif item.head is None:
                if seen_forward:
                    self.error("the forward block appears twice", item.clauses[0].names[0] if item.clauses else item)
                if stages:
                    self.error("the forward block must come before the stages", item.clauses[0].names[0] if item.clauses else item)
                seen_forward = True
                forward_line = item.line
                for clause in item.clauses:
                    if clause.kind != "keep":
                        self.error(f"the forward pass takes only keep clauses, not {clause.kind}", clause.names[0])
                        continue
                    forward_keep.extend(str(n) for n in clause.names)
            else:
                recompute: list[str] = []
                keep: list[str] = []
                free: list[str] = []
                for clause in item.clauses:
                    {"recompute": recompute, "keep": keep, "free": free}[clause.kind].extend(str(n) for n in clause.names)
                stages.append(StagePlan(str(item.head), tuple(recompute), tuple(keep), tuple(free), item.line))
        try:
            spec_path = _unquote(str(raw.spec_path), raw.spec_path.line or 0, raw.spec_path.column or 0)
        except _BadString as bad:
            self.error(bad.reason, raw.spec_path)
            spec_path = ""
        return Schedule(
            spec_path,
            str(raw.fingerprint),
            impls,
            tuple(forward_keep),
            tuple(stages),
            path=self.path,
            source="\n".join(self.lines) + "\n",
            impl_lines=impl_lines,
            forward_line=forward_line,
            line=raw.line,
        )


def _storage_size(tensor: Tensor, tensors: dict[str, Tensor]) -> int:
    while tensor.view_of is not None and tensor.view_of in tensors:
        tensor = tensors[tensor.view_of]
    return tensor.nbytes
