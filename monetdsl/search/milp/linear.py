"""Linear expressions and a model builder whose auxiliary variables know their definition.

Every variable of the joint MILP is either a *decision* (a binary the solver chooses:
implementation, recompute, carry) or an *auxiliary* continuous variable that the rows
pin to one exact value once the decisions are integral: a logical AND/OR of 0/1
quantities, or a running sum. The builder records that definition next to the rows it
emits, so the same object can

* hand HiGHS a sparse matrix (:meth:`ModelBuilder.matrix`), and
* evaluate every variable from the decisions alone (:meth:`ModelBuilder.complete`),
  which is how a schedule is encoded as a MIP start and how the model's own memory
  accounting of a decoded schedule is computed exactly, independently of solver
  tolerances.

Constants are folded as they appear: a decision fixed by the graph never becomes a
column, and an AND with a constant-0 operand is the constant 0. This keeps the model
small for HiGHS without a separate presolve pass.

    >>> b = ModelBuilder()
    >>> x, y = b.binary("x"), b.binary("y")
    >>> v = b.and_not(x, [y], "x and not y")
    >>> float(b.complete({x.var: 1, y.var: 0})[v.var])
    1.0
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

__all__ = ["Expr", "ModelBuilder", "INF", "total"]

INF = float("inf")


class Expr:
    """``const + sum(coef * var)``; immutable by convention (operations return new ones)."""

    __slots__ = ("const", "terms")

    def __init__(self, const: float = 0.0, terms: dict[int, float] | None = None):
        self.const = float(const)
        self.terms = terms if terms is not None else {}

    @staticmethod
    def of(value: "Expr | float | int") -> "Expr":
        return value if isinstance(value, Expr) else Expr(float(value))

    @property
    def var(self) -> int:
        """The column of a single-variable expression (``1 * x``)."""
        (col,) = self.terms
        return col

    def is_const(self) -> bool:
        return not self.terms

    def is_zero(self) -> bool:
        return not self.terms and self.const == 0.0

    def is_one(self) -> bool:
        return not self.terms and self.const == 1.0

    def __add__(self, other: "Expr | float | int") -> "Expr":
        other = Expr.of(other)
        terms = dict(self.terms)
        for col, coef in other.terms.items():
            value = terms.get(col, 0.0) + coef
            if value == 0.0:
                terms.pop(col, None)
            else:
                terms[col] = value
        return Expr(self.const + other.const, terms)

    __radd__ = __add__

    def __neg__(self) -> "Expr":
        return Expr(-self.const, {c: -v for c, v in self.terms.items()})

    def __sub__(self, other: "Expr | float | int") -> "Expr":
        # written out rather than ``self + (-other)``: every row is a difference, and the
        # negated copy was a third of a large model's build (the same values: IEEE
        # subtraction is the addition of the negation)
        other = Expr.of(other)
        terms = dict(self.terms)
        for col, coef in other.terms.items():
            value = terms.get(col, 0.0) - coef
            if value == 0.0:
                terms.pop(col, None)
            else:
                terms[col] = value
        return Expr(self.const - other.const, terms)

    def __rsub__(self, other: "Expr | float | int") -> "Expr":
        return Expr.of(other) + (-self)

    def __mul__(self, factor: float) -> "Expr":
        factor = float(factor)
        if factor == 0.0:
            return Expr()
        return Expr(self.const * factor, {c: v * factor for c, v in self.terms.items()})

    __rmul__ = __mul__

    def value(self, x) -> float:
        return self.const + sum(coef * x[col] for col, coef in self.terms.items())

    def __repr__(self) -> str:
        parts = [f"{v:+g}*x{c}" for c, v in self.terms.items()]
        return f"Expr({self.const:g} {' '.join(parts)})"


def total(items) -> Expr:
    """Sum of expressions (faster than ``sum`` for long lists)."""
    terms: dict[int, float] = {}
    const = 0.0
    for item in items:
        item = Expr.of(item)
        const += item.const
        for col, coef in item.terms.items():
            terms[col] = terms.get(col, 0.0) + coef
    return Expr(const, {c: v for c, v in terms.items() if v != 0.0})


@dataclass
class _Definition:
    kind: str  # "decision", "and_not", "or", "linear", "max"
    args: tuple = ()


@dataclass
class ModelBuilder:
    """Columns, rows and the definition of every auxiliary column."""

    names: list[str] = field(default_factory=list)
    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)
    integer: list[bool] = field(default_factory=list)
    definitions: list[_Definition] = field(default_factory=list)
    cost: dict[int, float] = field(default_factory=dict)
    row_cols: list[list[int]] = field(default_factory=list)
    row_vals: list[list[float]] = field(default_factory=list)
    row_lower: list[float] = field(default_factory=list)
    row_upper: list[float] = field(default_factory=list)
    row_names: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    offset: float = 0.0

    # columns --------------------------------------------------------------------------
    def _column(self, name: str, lower: float, upper: float, integer: bool, definition: _Definition) -> Expr:
        col = len(self.names)
        self.names.append(name)
        self.lower.append(lower)
        self.upper.append(upper)
        self.integer.append(integer)
        self.definitions.append(definition)
        return Expr(0.0, {col: 1.0})

    def binary(self, name: str) -> Expr:
        """A 0/1 decision the solver chooses."""
        return self._column(name, 0.0, 1.0, True, _Definition("decision"))

    def continuous(self, name: str, lower: float, upper: float, definition: _Definition) -> Expr:
        return self._column(name, lower, upper, False, definition)

    def product_column(self, a: Expr, b: Expr, name: str) -> Expr:
        """A column defined as ``a AND b`` whose rows the caller writes (a leaner family
        than :meth:`and_not` when several products share ``a``, as ``W = R AND y`` do)."""
        return self._column(name, 0.0, 1.0, False, _Definition("and_not", (a, (Expr(1.0) - b,))))

    @property
    def num_cols(self) -> int:
        return len(self.names)

    @property
    def num_rows(self) -> int:
        return len(self.row_lower)

    # rows ------------------------------------------------------------------------------
    def row(self, expr: Expr, lower: float = -INF, upper: float = INF, name: str = "") -> None:
        """``lower <= expr <= upper``; a constant row must already hold (else a bug)."""
        if expr.is_const():
            if not (lower - 1e-9 <= expr.const <= upper + 1e-9):
                self.conflicts.append(name)  # e.g. a budget below a step that always runs
            return
        self.row_cols.append(list(expr.terms))
        self.row_vals.append(list(expr.terms.values()))
        self.row_lower.append(lower - expr.const)
        self.row_upper.append(upper - expr.const)
        self.row_names.append(name)

    def le(self, lhs: Expr | float, rhs: Expr | float, name: str = "") -> None:
        self.row(Expr.of(lhs) - Expr.of(rhs), upper=0.0, name=name)

    def eq(self, lhs: Expr | float, rhs: Expr | float, name: str = "") -> None:
        self.row(Expr.of(lhs) - Expr.of(rhs), 0.0, 0.0, name=name)

    # exact logic over 0/1 expressions -----------------------------------------------------
    def and_not(self, pos: Expr, negs: list[Expr], name: str) -> Expr:
        """``pos AND NOT neg_1 AND ... AND NOT neg_k`` for 0/1-valued expressions.

        Rows: ``v <= pos``, ``v <= 1 - neg_j``, ``v >= pos - sum(neg_j)``: with integral
        operands they leave exactly one value, so ``v`` is continuous.
        """
        if pos.is_zero() or any(n.is_one() for n in negs):
            return Expr()
        negs = [n for n in negs if not n.is_zero()]
        if not negs:
            return pos
        v = self.continuous(name, 0.0, 1.0, _Definition("and_not", (pos, tuple(negs))))
        if not pos.is_one():
            self.le(v, pos, name)
        for n in negs:
            self.le(v + n, 1.0, name)
        self.row(v - pos + total(negs), lower=0.0, name=name)
        return v

    def either(self, terms: list[Expr], name: str) -> Expr:
        """``term_1 OR ... OR term_k`` for 0/1-valued expressions (``v >= t_j``, ``v <= sum t_j``)."""
        terms = [t for t in terms if not t.is_zero()]
        if not terms:
            return Expr()
        if any(t.is_one() for t in terms):
            return Expr(1.0)
        if len(terms) == 1:
            return terms[0]
        v = self.continuous(name, 0.0, 1.0, _Definition("or", (tuple(terms),)))
        for t in terms:
            self.le(t, v, name)
        self.le(v, total(terms), name)
        return v

    def defined(self, expr: Expr, name: str, lower: float = 0.0, upper: float = INF) -> Expr:
        """A continuous column equal to ``expr`` (used for running sums, so rows stay sparse)."""
        if expr.is_const() or (len(expr.terms) == 1 and expr.const == 0.0 and next(iter(expr.terms.values())) == 1.0):
            return expr
        v = self.continuous(name, lower, upper, _Definition("linear", (expr,)))
        self.eq(v, expr, name)
        return v

    def maximum(self, name: str, upper: float = INF) -> Expr:
        """A column bounded below by expressions added later with :meth:`bound_below`."""
        return self.continuous(name, 0.0, upper, _Definition("max", ([],)))

    def bound_below(self, v: Expr, expr: Expr, name: str = "") -> None:
        self.definitions[v.var].args[0].append(expr)
        self.le(expr, v, name)

    # objective and export -----------------------------------------------------------------
    def minimise(self, expr: Expr) -> None:
        """Set the objective; its constant part is kept in :attr:`offset`."""
        self.cost = dict(expr.terms)
        self.offset = expr.const

    def matrix(self) -> tuple[np.ndarray, sparse.csr_array, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(c, A, row_lower, row_upper, col_lower, col_upper, integrality)`` for HiGHS."""
        key = (self.num_cols, self.num_rows, tuple(sorted(self.cost.items())))
        cached = self.__dict__.get("_matrix")
        if cached is not None and cached[0] == key:
            return cached[1]
        result = self._matrix()
        self.__dict__["_matrix"] = (key, result)
        return result

    def _matrix(self):
        n = self.num_cols
        c = np.zeros(n)
        for col, coef in self.cost.items():
            c[col] = coef
        indptr = np.zeros(self.num_rows + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(r) for r in self.row_cols])
        cols = np.fromiter((c_ for r in self.row_cols for c_ in r), dtype=np.int64, count=int(indptr[-1]))
        vals = np.fromiter((v for r in self.row_vals for v in r), dtype=float, count=int(indptr[-1]))
        a = sparse.csr_array((vals, cols, indptr), shape=(self.num_rows, n))
        return (
            c,
            a,
            np.array(self.row_lower, dtype=float),
            np.array(self.row_upper, dtype=float),
            np.array(self.lower, dtype=float),
            np.array(self.upper, dtype=float),
            np.array(self.integer, dtype=np.uint8),
        )

    # evaluation --------------------------------------------------------------------------
    def complete(self, decisions: dict[int, float]) -> np.ndarray:
        """Every column's value from the decisions, by each auxiliary column's definition.

        Columns are defined only in terms of earlier columns, so one pass in column order
        suffices. Missing decisions default to 0.
        """
        x = np.zeros(self.num_cols)
        for col, definition in enumerate(self.definitions):
            kind = definition.kind
            if kind == "decision":
                x[col] = float(round(decisions.get(col, 0.0)))
            elif kind == "and_not":
                pos, negs = definition.args
                x[col] = 1.0 if pos.value(x) > 0.5 and all(n.value(x) < 0.5 for n in negs) else 0.0
            elif kind == "or":
                x[col] = 1.0 if any(t.value(x) > 0.5 for t in definition.args[0]) else 0.0
            elif kind == "linear":
                x[col] = definition.args[0].value(x)
            elif kind == "max":
                exprs = definition.args[0]
                x[col] = max([e.value(x) for e in exprs], default=0.0)
            else:  # pragma: no cover - every column gets one of the kinds above
                raise AssertionError(kind)
        return x

    def violations(self, x: np.ndarray, tol: float = 1e-7) -> list[str]:
        """Names of the rows and bounds ``x`` breaks (empty for a feasible point)."""
        _, a, rl, ru, cl, cu, _ = self.matrix()
        x = np.asarray(x, dtype=float)
        bad = [
            f"bound of {self.names[c]} ({x[c]} not in [{cl[c]}, {cu[c]}])"
            for c in np.flatnonzero((x < cl - tol) | (x > cu + tol))
        ]
        values = a @ x
        bad += [
            f"row {self.row_names[r]} ({rl[r]} <= {values[r]} <= {ru[r]})"
            for r in np.flatnonzero((values < rl - tol) | (values > ru + tol))
        ]
        return bad
