"""Hostile input: shipped specs and schedules, mutated (lines deleted, duplicated, swapped,
words exchanged, random bytes, truncation), through ``monetdsl check`` (and a schedule
through ``monetdsl show`` too) in-process.

Whatever the mutation, the answer is exit status 0 (still valid) or 1 with located
errors (file and line), never a traceback and never another status.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monetdsl.cli import main
from monetdsl.grammar import format_schedule, load_spec
from monetdsl.search import solve

from .spec_files import SPECS_DIR

#: small shipped specs (the large ones take longer to parse than a fuzz example should)
FUZZED_SPECS = ("tiny_chain", "resblock", "transformer_block", "small_cnn", "tiny_gpt")
#: (spec, method) pairs whose schedules are mutated
FUZZED_SCHEDULES = (("tiny_chain", "chen-sqrt"), ("resblock", "store-all"), ("transformer_block", "recompute-all"))


@functools.lru_cache(maxsize=None)
def original(kind: str, name: str) -> bytes:
    """The text of a shipped spec, or of a schedule solved for it (cached: hypothesis
    prints the arguments of a failing example, and these are long)."""
    if kind == "spec":
        return (SPECS_DIR / f"{name}.monet").read_bytes()
    spec = load_spec(SPECS_DIR / f"{name}.monet")
    result = solve(spec, dict(FUZZED_SCHEDULES)[name])
    return format_schedule(result.schedule, spec.network, header=["fuzzed"]).encode()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@st.composite
def mutations(draw, text: bytes) -> bytes:
    """``text`` with one to three mutations."""
    for _ in range(draw(st.integers(1, 3))):
        lines = text.splitlines(keepends=True) or [b""]
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "words", "bytes", "truncate"]))
        i = draw(st.integers(0, len(lines) - 1))
        j = draw(st.integers(0, len(lines) - 1))
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "words":  # a word of one line in place of a word of another
            a, b = re.findall(rb"[^\s(),]+", lines[i]), re.findall(rb"[^\s(),]+", lines[j])
            if a and b:
                old, new = draw(st.sampled_from(a)), draw(st.sampled_from(b))
                lines[i] = lines[i].replace(old, new, 1)
        text = b"".join(lines)
        if kind == "bytes":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.binary(min_size=1, max_size=6)) + text[at:]
        elif kind == "truncate":
            text = text[: draw(st.integers(0, len(text)))]
    return text


def _check(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _assert_located_or_valid(code: int, out: str, err: str, mutated: str) -> None:
    assert "Traceback" not in err
    assert code in (0, 1), err
    data = json.loads(out)
    if code == 0:
        assert data["ok"] is True
        return
    assert data["ok"] is False and data["errors"], err
    for error in data["errors"]:
        assert error["file"] == mutated and error["line"] >= 1, error


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _fuzz_once(folder, data, kind: str, name: str) -> None:
    """Check one mutation of ``name``'s spec or schedule."""
    text = data.draw(mutations(original(kind, name)))
    path = folder / (f"{name}.monet" if kind == "spec" else f"{name}.schedule.monet")
    path.write_bytes(text)
    argv = ["check", str(path)] if kind == "spec" else ["check", str(SPECS_DIR / f"{name}.monet"), "--schedule", str(path)]
    code, out, err = _check([*argv, "--json"])
    _assert_located_or_valid(code, out, err, str(path))
    if kind == "schedule":  # show reads the same file: the same answer, in words
        shown, _, err = _check(["show", str(path), "--spec", str(SPECS_DIR / f"{name}.monet")])
        assert shown == code and "Traceback" not in err, err


@pytest.mark.parametrize("name", FUZZED_SPECS)
@FUZZ
@given(data=st.data())
def test_a_mutated_spec_is_valid_or_a_located_error(folder, name, data):
    _fuzz_once(folder, data, "spec", name)


@pytest.mark.parametrize("name", [name for name, _ in FUZZED_SCHEDULES])
@FUZZ
@given(data=st.data())
def test_a_mutated_schedule_is_valid_or_a_located_error(folder, name, data):
    _fuzz_once(folder, data, "schedule", name)


@pytest.mark.parametrize(
    "text, command",
    [
        (b'network n\n  tensor "a\\x" f32[1] input\n  output "a\\x"\n', "spec"),
        (b'network n\n  tensor x f32[1] input\n  op f (x) -> y f32[1] time 1us\n    backward reads (grad("y\\x")) -> grad(x) time 1us\n  output y\n', "spec"),
        (b'schedule for "a\x00b" fingerprint 1234\n  forward\n', "schedule"),
        (b'schedule for "\\N{no such name}" fingerprint 1234\n  forward\n', "schedule"),
    ],
    ids=["bad escape in a name", "bad escape in a gradient", "NUL in the spec path", "unknown character name"],
)
def test_quoted_text_that_does_not_decode_is_a_located_error(folder, text, command):
    """Mutations the fuzz test found: escapes Python cannot decode inside quotes."""
    path = folder / f"quoted.{command}.monet"
    path.write_bytes(text)
    argv = ["check", str(path)] if command == "spec" else ["check", str(SPECS_DIR / "tiny_chain.monet"), "--schedule", str(path)]
    code, out, err = _check([*argv, "--json"])
    _assert_located_or_valid(code, out, err, str(path))
    assert code == 1 and "cannot read the quoted text" in out
