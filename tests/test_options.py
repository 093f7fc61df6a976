"""Options mean the same, and fail the same way, on the command line, in solve() and in
optimize(): one check (monetdsl.options), one error type (OptionError), exit status 2."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import monetdsl
from monetdsl.cli import main
from monetdsl.errors import OptionError, SpecError
from monetdsl.grammar import load_spec, parse_spec
from monetdsl.options import ENGINE_OPTIONS, check_search_options
from monetdsl.search import solve

from .spec_files import SPECS_DIR

TINY = str(SPECS_DIR / "tiny_chain.monet")


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("memory_budget", "6 parsecs", "is not a memory size"),
        ("memory_budget", "6", "is not a memory size"),
        ("memory_budget", "1e400GiB", "more than monetdsl can count"),
        ("memory_budget", -3, "must be positive"),
        ("memory_budget", True, "number of bytes"),
        ("max_overhead", "10", "write a percentage, e.g. 10%"),
        ("max_overhead", "10 MiB", "is not a percentage"),
        ("max_overhead", -0.1, "fraction >= 0"),
        ("max_overhead", float("nan"), "fraction >= 0"),
        ("time_limit", 0, "positive number of seconds"),
        ("time_limit", float("inf"), "positive number of seconds"),
        ("objective", "speed", "unknown objective"),
        ("options", {"gapp": 0.1}, "unknown option 'gapp'"),
        ("options", {"gap": "1"}, "write a percentage"),
        ("options", {"gap": 1.5}, "below 100%"),
        ("options", {"gap": "200%"}, "below 100%, not 200%"),
        ("memory_budget", "-5MiB", "must not be negative, not '-5MiB'"),
        ("max_overhead", "-5%", "must not be negative"),
        ("options", {"backend": "gurobi"}, "'highspy' or 'scipy'"),
        ("options", {"workers": 0}, "positive whole number"),
        ("method", "nope", "unknown method 'nope'"),
    ],
)
def test_every_caller_gets_the_same_error_for_a_bad_option(option, value, words):
    with pytest.raises(OptionError, match=words):
        check_search_options(**{option: value}, methods=["milp"])
    spec = load_spec(TINY)
    with pytest.raises(OptionError, match=words):  # solve() spells options its own way: the same check
        solve(spec, **({"method": value} if option == "method" else {option: value}))
    if option in ("memory_budget", "max_overhead", "method", "time_limit"):
        name = {"memory_budget": "budget"}.get(option, option)
        with pytest.raises(OptionError, match=words):
            monetdsl.optimize(torch.nn.Linear(2, 2), **{name: value})


def test_values_are_converted_once_whatever_their_form():
    text = check_search_options(memory_budget="6GiB", max_overhead="10%", time_limit=5, options={"gap": "1%"})
    numbers = check_search_options(memory_budget=6 * 2**30, max_overhead=0.1, time_limit=5.0, options={"gap": 0.01})
    assert text == numbers
    assert text.memory_budget == 6 * 2**30 and text.max_overhead == pytest.approx(0.1) and text.options == {"gap": 0.01}
    assert solve(load_spec(TINY), "store-all", memory_budget="1GiB").status == "feasible"


def test_every_engine_option_is_documented_and_accepted():
    good = {"gap": 0.01, "backend": "scipy", "polish": False, "evict": True, "refine": True, "refine_max_ops": 10, "target_ops": 8,
            "workers": 1, "menu_seconds": 2.5, "grid": 2, "rounds": 0, "kicks": None, "dp_backend": "numba",
            "restricted_share": 0.25, "exact_first": 0.6,
            "stall_share": None, "min_stall": 0.5, "tolerance": 0.01, "seconds_per_op": 0.2}
    assert set(good) == set(ENGINE_OPTIONS)
    assert check_search_options(options=good).options == good


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--max-overhead", "10"], "--max-overhead: a bare 10 is ambiguous; write a percentage, e.g. 10%"),
        (["--budget", "1e400GiB"], "--budget: '1e400GiB' is more than monetdsl can count"),
        (["--budget", "20"], "--budget: '20' is not a memory size"),
        (["--budget", "-5MiB"], "--budget: must not be negative"),
        (["--gap", "200%"], "--gap: must be below 100%, not 200%"),
        (["--method", "nope"], "--method: unknown method 'nope'"),
        (["--gap", "1"], "--gap: a bare 1 is ambiguous"),
        (["--time-limit", "nan"], "--time-limit: must be a positive number of seconds"),
        (["--min-memory", "--method", "store-all"], "--min-memory needs a method that searches"),
    ],
)
def test_bad_flags_are_usage_errors(capsys, argv, words):
    assert main(["solve", TINY, "--no-write", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert main(["solve", TINY, "--no-write", "--json", *argv]) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and words in data["errors"][0]["message"]


def test_the_spec_text_reads_percentages_as_the_flags_do():
    text = (SPECS_DIR / "tiny_chain.monet").read_text()
    assert "overhead <=" not in text
    assert parse_spec(text + "  overhead <= 10%\n").constraints.max_overhead == pytest.approx(0.1)
    with pytest.raises(SpecError, match="write a percentage") as err:
        parse_spec(text + "  overhead <= 10\n", "t.monet")
    assert err.value.diagnostics[0].line == len(text.splitlines()) + 1


def test_an_unknown_implementation_beside_a_known_one_is_located(tmp_path, capsys):
    path = tmp_path / "pinned.monet"
    text = (SPECS_DIR / "tiny_chain.monet").read_text()
    path.write_text(text + "  impl relu1 in (plain, turbo)\n")
    assert main(["check", str(path), "--json"]) == 1
    error = json.loads(capsys.readouterr().out)["errors"][0]
    assert error["message"] == "impl relu1: op relu1 has no implementation turbo; it has plain, inplace, mask"
    assert (error["file"], error["line"], error["column"]) == (str(path), len(text.splitlines()) + 1, 3)


def test_help_documents_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for status in ("0 ", "1 ", "2 ", "130 "):
        assert f"\n  {status}" in out
    assert "usage error" in out and "Ctrl-C" in out


def test_an_infeasible_budget_a_few_bytes_short_shows_the_bytes(tmp_path, capsys):
    """MiB rounding must not hide the difference (20.00 MiB against 20.00 MiB)."""
    spec = tmp_path / "tiny_chain.monet"
    shutil.copy(SPECS_DIR / "tiny_chain.monet", spec)
    assert main(["solve", str(spec), "--budget", "20MiB", "--no-write", "-q"]) == 1
    err = capsys.readouterr().err
    assert "20.00 MiB (20971520 B)" in err and "exactly 20.00 MiB (20971528 B)" in err


@pytest.mark.parametrize(
    "old, new, words",
    [
        ("h1 f32[1024,512] time 300us", "h1 f32[1024,512] time 1e400us", "too long a duration"),
        ("h1 f32[1024,512] time 300us", "h1 f32[1024,99999999999999999999999] time 300us", "more than monetdsl can count"),
        ("memory <= 21MiB", "memory <= 1e400GiB", "more than monetdsl can count"),
    ],
)
def test_quantities_beyond_what_can_be_counted_are_located_errors(tmp_path, capsys, old, new, words):
    text = (SPECS_DIR / "tiny_chain.monet").read_text()
    assert old in text
    path = tmp_path / "huge.monet"
    path.write_text(text.replace(old, new))
    assert main(["check", str(path), "--json"]) == 1
    error = json.loads(capsys.readouterr().out)["errors"][0]
    assert words in error["message"] and error["line"] == text.splitlines().index(next(l for l in text.splitlines() if old in l)) + 1


def test_optimize_refuses_a_cap_above_one_written_as_a_number():
    """In Python a cap is a fraction: ``max_overhead=10`` is far more likely a percentage
    without its sign than a 1000 % cap, so it is refused with both spellings."""
    with pytest.raises(OptionError, match="would mean 1000%"):
        monetdsl.optimize(torch.nn.Linear(2, 2), max_overhead=10)
    with pytest.raises(OptionError, match="would mean 1000%"):
        monetdsl.backend(max_overhead=10)
