"""Bad input gets a located, readable error, never a traceback.

Each broken spec under ``tests/broken/`` holds one mistake. The table says where the
error must point (line, column) and what the message must say.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from monetdsl.cli import main
from monetdsl.errors import MonetError, SpecError, SpecSyntaxError
from monetdsl.grammar import load_spec

BROKEN = Path(__file__).resolve().parent / "broken"

CASES = {
    # syntax
    "missing_unit": (SpecError, 3, 29, "40 has no unit (write e.g. 40us)"),
    "wrong_unit_kind": (SpecError, 3, 29, "'4MiB' is not a duration"),
    "missing_arrow": (SpecSyntaxError, 3, 12, "unexpected 'y'; expected '->'"),
    "bad_indent": (SpecSyntaxError, 5, 5, "indentation does not match any outer level"),
    "unclosed_paren": (SpecSyntaxError, 3, 11, "expected ')' or ','"),
    "unclosed_shape": (SpecSyntaxError, 2, 15, "'[' is never closed on this line"),
    "bad_char": (SpecSyntaxError, 3, 33, "unexpected character '@'"),
    "unknown_dtype": (SpecSyntaxError, 2, 12, "unexpected 'f64x'"),
    # names
    "unknown_tensor": (SpecError, 4, 9, "op b reads z, but no tensor of that name is declared or produced"),
    "duplicate_op": (SpecError, 4, 6, "operator a is declared twice (first at line 3)"),
    "duplicate_tensor": (SpecError, 4, 15, "tensor y is declared twice (first at line 3)"),
    "missing_time": (SpecError, 3, 6, "op a impl default has no time"),
    # graph
    "cycle": (SpecError, 3, 3, "the forward ops form a cycle: a -> b -> a"),
    "unproduced_gradient": (SpecError, 4, 5, "backward op a.backward reads grad(y), which nothing produces"),
    "forward_reads_derived": (SpecError, 6, 3, "forward op b reads y.mask, which only some implementations of relu produce"),
    "inplace_read_later": (SpecError, 6, 5, "overwrites y, which add reads later in the forward pass"),
    # sizes
    "size_mismatch": (SpecError, 2, 21, "f32[4,4] is 64 bytes but 60B was given"),
    "view_too_big": (SpecError, 4, 15, "view yv (32 bytes) is larger than the storage of y (16 bytes)"),
    # constraints
    "inplace_vs_keep": (SpecError, 9, 3, "keep y conflicts with op relu: every implementation it may use (inplace) overwrites y"),
    "unknown_impl_pin": (SpecError, 9, 3, "op relu has no implementation bitmask; it has plain, mask"),
    "pattern_matches_nothing": (SpecError, 7, 3, "never recompute conv*: no forward op matches"),
    # wrong kind of file
    "schedule_as_spec": (SpecError, 1, 1, "no network section in this file (this looks like a schedule"),
}


def test_every_broken_file_has_a_case():
    assert {p.stem for p in BROKEN.glob("*.monet")} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_error_is_located_and_explained(name):
    kind, line, column, text = CASES[name]
    path = BROKEN / f"{name}.monet"
    with pytest.raises(MonetError) as info:
        load_spec(path)
    assert isinstance(info.value, kind)
    first = info.value.diagnostics[0]
    assert (first.line, first.column) == (line, column), first.format()
    assert text in first.message
    formatted = first.format()
    assert formatted.startswith(f"{path}:{line}:{column}: ")
    source_line = path.read_text().splitlines()[line - 1]
    assert source_line.rstrip() in formatted
    caret_line = formatted.splitlines()[-1]
    assert caret_line.index("^") - 4 == column - 1  # the caret sits under the column


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_reports_without_traceback(name, capsys):
    path = BROKEN / f"{name}.monet"
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{path}:{CASES[name][1]}:{CASES[name][2]}:" in err


def test_cli_json_errors(capsys):
    path = BROKEN / "unknown_tensor.monet"
    assert main(["check", str(path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False
    assert data["errors"][0] == {
        "file": str(path),
        "line": 4,
        "column": 9,
        "message": "op b reads z, but no tensor of that name is declared or produced",
    }


def test_several_problems_are_reported_together(tmp_path):
    path = tmp_path / "two.monet"
    path.write_text("network n\n  tensor x f32[4] input\n  op a (q) -> y f32[4] time 1us\n  op b (r) -> z f32[4] time 1us\n  output z\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert [d.line for d in info.value.diagnostics] == [3, 4]


def test_missing_file_is_an_error_not_a_crash(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.monet")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["solve"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
