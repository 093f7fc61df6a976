"""The search options, checked in one place for every way of asking: the command line,
:func:`monetdsl.search.solve` and :func:`monetdsl.optimize`.

A budget, an overhead cap, a time limit, a method, an objective and the engines' extra
``options`` mean the same whoever passes them, so one function decides what is valid and
every caller reports the same mistake in the same words (spelled the caller's way:
``--budget`` on the command line, ``budget`` in :func:`monetdsl.optimize`). Text is read
with units: a budget needs one (``6GiB``), an overhead cap or a gap is a percentage
(``10%``); a bare ``10`` could mean 10 % or 1000 %, so it is refused with a hint. Numbers
passed from Python are bytes and fractions (``0.1`` is 10 %). A bad value raises
:class:`~monetdsl.errors.OptionError` (the command line's usage error, exit status 2).

>>> check_search_options(memory_budget="6GiB", max_overhead="10%").memory_budget
6442450944
>>> check_search_options(max_overhead="10", spelling=CLI_SPELLING)
Traceback (most recent call last):
...
monetdsl.errors.OptionError: monetdsl: --max-overhead: a bare 10 is ambiguous; write a percentage, e.g. 10%
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping

from .errors import Diagnostic, OptionError
from .units import MAX_BYTES, UnitError, parse_bytes, parse_fraction

__all__ = ["SearchOptions", "EngineOption", "ENGINE_OPTIONS", "OBJECTIVES", "CLI_SPELLING", "check_search_options", "option_error"]

#: "compute": fastest schedule within the budget; "memory": lowest peak within the cap
OBJECTIVES = ("compute", "memory")

def _whole(least: int) -> Callable[[object], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= least


def _one_of(*names: str) -> Callable[[object], bool]:
    return lambda value: isinstance(value, str) and value in names


def _flag(value) -> bool:
    return isinstance(value, bool)


def _at_least_zero(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _positive_seconds(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class EngineOption:
    """One key of ``options``: what it means, and which values it takes."""

    description: str
    accepts: Callable[[object], bool]


#: the keys of ``options`` the searching methods read (``gap`` is read as a fraction, below)
ENGINE_OPTIONS: dict[str, EngineOption] = {
    "gap": EngineOption("a relative optimality gap in [0, 1) (0.01 = 1 %, or text such as '1%')", lambda value: True),
    "backend": EngineOption("the HiGHS interface: 'highspy' or 'scipy'", _one_of("highspy", "scipy")),
    "polish": EngineOption("True or False: spend the time left on the fastest schedule at the least peak", _flag),
    "evict": EngineOption("True or False: let the hybrid engine start from store-all with tensors evicted around its peak", _flag),
    "refine": EngineOption("True or False: let the hybrid engine refine its schedule with the joint MILP", _flag),
    "refine_max_ops": EngineOption("a positive whole number: the largest network the hybrid engine refines", _whole(1)),
    "target_ops": EngineOption("a positive whole number: forward ops per block of the hybrid engine", _whole(1)),
    "workers": EngineOption("a positive whole number: processes that build the hybrid engine's menus", _whole(1)),
    "menu_seconds": EngineOption("a positive number of seconds for the hybrid engine's menus", _positive_seconds),
    "grid": EngineOption("a positive whole number: budgets per block menu", _whole(1)),
    "rounds": EngineOption("a whole number >= 0: rounds of targeted block solves", _whole(0)),
    "kicks": EngineOption("a whole number >= 0, or None: perturbations of the local search", lambda value: value is None or _whole(0)(value)),
    "dp_backend": EngineOption("the chain DP's loops: 'numpy' or 'numba'", _one_of("numpy", "numba")),
    "restricted_share": EngineOption(
        "a fraction in [0, 1): the hybrid engine's time for the search restricted to each op's first implementation"
        " (0: none)", lambda value: isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1),
    "exact_first": EngineOption(
        "a fraction in [0, 1): with the memory objective, the hybrid engine's time for the whole network's MILP first,"
        " on networks it refines (by default 0.6 where a batch-sliced segment is, none elsewhere; 0: none)",
        lambda value: isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1),
    "stall_share": EngineOption("a number >= 0, or None: the hybrid engine stops after this share of its running time without"
                                " improving (None: it searches until the time limit)", lambda value: value is None or _at_least_zero(value)),
    "min_stall": EngineOption("a number of seconds >= 0: the least time the hybrid engine waits for an improvement", _at_least_zero),
    "seconds_per_op": EngineOption("a number of seconds >= 0, or None: without a time limit, the hybrid engine searches this"
                                   " long per forward op (at least 3 s, at most 60 s; None or 0: 60 s)",
                                   lambda value: value is None or _at_least_zero(value)),
    "tolerance": EngineOption("a fraction >= 0, or None: the hybrid engine stops once its best is within this share above"
                              " a proved lower bound (None or 0: never for that)", lambda value: value is None or _at_least_zero(value)),
}

#: how the command line spells each option in messages
CLI_SPELLING = {
    "memory_budget": "--budget",
    "max_overhead": "--max-overhead",
    "time_limit": "--time-limit",
    "method": "--method",
    "objective": "--min-memory",
    "gap": "--gap",
    "backend": "--solver",
}

@dataclass(frozen=True)
class SearchOptions:
    """Checked options: bytes, fractions and seconds, whatever form they came in."""

    method: str = "auto"
    memory_budget: int | None = None
    max_overhead: float | None = None
    time_limit: float | None = None
    objective: str | None = None
    options: dict = field(default_factory=dict)
    #: the runtime's batch-sliced segments under a budget (monetdsl.optimize's ``segments``)
    segments: bool = True


def option_error(message: str, where: str = "monetdsl") -> OptionError:
    """The error for one bad option (``where`` names the caller: the CLI, an API function)."""
    return OptionError(Diagnostic(message, where))


def check_search_options(
    *,
    method: str = "auto",
    memory_budget: int | str | None = None,
    max_overhead: float | str | None = None,
    time_limit: float | None = None,
    objective: str | None = None,
    options: Mapping | None = None,
    methods: Collection[str] | None = None,
    spelling: Mapping[str, str] | None = None,
    where: str = "monetdsl",
    caps_up_to_one: bool = False,
    segments: bool = True,
) -> SearchOptions:
    """Every option checked and converted, or :class:`OptionError` for the first bad one.

    ``methods`` lists the known method names (``auto`` is always known); without it the
    method is not checked. ``spelling`` maps an option to the caller's name for it.
    ``caps_up_to_one``: a cap given as a number must be at most 1 (for callers whose
    users write numbers: ``max_overhead=10`` is far more often a percentage without its
    sign than a 1000 % cap; internal callers pass caps already converted from ``"150%"``).
    """
    names = dict(spelling or {})

    def fail(option: str, message: str) -> OptionError:
        return option_error(f"{names.get(option, option)}: {message}", where)

    if not isinstance(method, str) or (methods is not None and method != "auto" and method not in methods):
        known = "auto" + ("" if methods is None else ", " + ", ".join(methods))
        raise fail("method", f"unknown method {method!r}; choose one of: {known}")
    budget = _budget(memory_budget, fail)
    if caps_up_to_one and isinstance(max_overhead, (int, float)) and not isinstance(max_overhead, bool) and max_overhead > 1:
        raise fail("max_overhead", f"a number is a fraction (0.1 = 10 %), so {max_overhead:g} would mean "
                                   f"{max_overhead:.0%}; for {max_overhead:g} % write {max_overhead / 100:g} or "
                                   f"'{max_overhead:g}%', for {max_overhead:.0%} write '{max_overhead:.0%}'")
    overhead = _fraction(max_overhead, "max_overhead", fail, upper=None)
    if time_limit is not None:
        if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not math.isfinite(time_limit) or time_limit <= 0:
            raise fail("time_limit", f"must be a positive number of seconds, not {time_limit!r}")
        time_limit = float(time_limit)
    if objective is not None and objective not in OBJECTIVES:
        raise fail("objective", f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    if not _flag(segments):
        raise fail("segments", f"must be True or False (run the widest blocks as batch-sliced segments), not {segments!r}")
    return SearchOptions(method, budget, overhead, time_limit, objective, _engine_options(options, fail), segments)


def _budget(value, fail) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = parse_bytes(value)
        except UnitError as exc:
            raise fail("memory_budget", str(exc)) from None
    elif isinstance(value, float) and value.is_integer() and math.isfinite(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail("memory_budget", f"must be a number of bytes or a size such as '6GiB', not {value!r}")
    if value <= 0:
        raise fail("memory_budget", f"must be positive, not {value} B")
    if value > MAX_BYTES:
        raise fail("memory_budget", f"{value} B is more than monetdsl can count ({MAX_BYTES} B)")
    return value


def _fraction(value, option: str, fail, *, upper: float | None) -> float | None:
    if value is None:
        return None
    given = value
    if isinstance(value, str):
        try:
            value = parse_fraction(value)
        except UnitError as exc:
            raise fail(option, str(exc)) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise fail(option, f"must be a fraction >= 0 (0.1 = 10 %), not {given!r}")
    if upper is not None and value >= upper:
        shown = given.strip() if isinstance(given, str) else f"{value:.4g}"
        raise fail(option, f"must be below {upper:.0%}, not {shown}")
    return float(value)


def _engine_options(options: Mapping | None, fail) -> dict:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise fail("options", f"must be a dict of engine options, not {type(options).__name__}")
    unknown = [key for key in options if key not in ENGINE_OPTIONS]
    if unknown:
        raise fail("options", f"unknown option {unknown[0]!r}; the engines read: {', '.join(ENGINE_OPTIONS)}")
    checked = dict(options)
    for key, value in options.items():
        if key == "gap":
            checked[key] = _fraction(value, "gap", fail, upper=1.0)
        elif not ENGINE_OPTIONS[key].accepts(value):
            raise fail(key, f"{value!r}: {ENGINE_OPTIONS[key].description}")
    return checked
