"""Every example a user is shown runs as shown.

The examples are read from the documents themselves, so an edit of the README, a page of
``docs/`` or a ``--help`` text is tested as written: each ``monetdsl ...`` line of a
``bash`` block (and of each command's ``--help`` epilog) runs in-process through
:func:`monetdsl.cli.main` in a scratch copy of ``specs/``, and must exit 0; a README line
written as ``$ monetdsl ...`` followed by its output must print that output (solve times
aside). Each ``python`` block runs as a script. Examples that train or search
full-sized models are marked ``slow``.
"""
from __future__ import annotations

import re
import runpy
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from monetdsl import cli

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]

#: examples naming these run for minutes, or tens of seconds, on a 2-core CPU: full-sized
#: models, costs timed on the machine, a 60 s search, a sweep of exact searches
HEAVY = ("resnet50", "gpt2_small", "gpt_like", "resnet18_like", "--time-limit 60", "--profile", "monetdsl sweep")

#: what a command prints that changes from run to run: the solve time in brackets
_VOLATILE = re.compile(r"\[\d+(\.\d+)? s\]")


@dataclass(frozen=True)
class Example:
    source: str
    line: int
    command: str
    expected: tuple[str, ...] = ()  # output shown after a ``$`` prompt, if any

    @property
    def heavy(self) -> bool:
        return any(word in self.command for word in HEAVY)


def _fenced_blocks(path: Path, language: str):
    """(first line number, lines) of each fenced block of ``language``."""
    lines = path.read_text().splitlines()
    block, start = None, 0
    for number, text in enumerate(lines, 1):
        if block is None and text.strip() == f"```{language}":
            block, start = [], number + 1
        elif block is not None and text.strip() == "```":
            yield start, block
            block = None
        elif block is not None:
            block.append(text)


def shell_examples(path: Path) -> list[Example]:
    examples = []
    for start, block in _fenced_blocks(path, "bash"):
        for offset, text in enumerate(block):
            prompt = text.startswith("$ ")
            command = text[2:] if prompt else text
            if not command.startswith("monetdsl "):
                continue
            expected = []
            if prompt:
                for following in block[offset + 1:]:
                    if following.startswith("$ "):
                        break
                    expected.append(following)
            examples.append(Example(f"{path.relative_to(ROOT)}", start + offset, command, tuple(expected)))
    return examples


def help_examples() -> list[Example]:
    """The examples at the end of ``monetdsl --help`` and of each command's ``--help``,
    in an order where a command that writes a file runs before one that reads it, after
    the quick start's solve (the help texts show the schedule it writes)."""
    parser = cli.build_parser()
    subparsers = next(action for action in parser._actions if action.__class__.__name__ == "_SubParsersAction")
    order = ["solve", "check", "show", "sweep", "trace", "bench", "import"]
    texts = [(f"monetdsl {name} --help", subparsers.choices[name].format_help()) for name in order]
    texts.append(("monetdsl --help", parser.format_help()))
    examples = [Example("quick start", 1, "monetdsl solve specs/tiny_chain.monet")]
    for source, text in texts:
        for number, line in enumerate(text.splitlines(), 1):
            if line.startswith("  monetdsl "):
                examples.append(Example(source, number, line.strip()))
    return examples


def _run(example: Example, capsys) -> str:
    words = shlex.split(example.command, comments=True)
    assert words[0] == "monetdsl"
    status = cli.main(words[1:])
    out = capsys.readouterr().out
    assert status == 0, f"{example.source}:{example.line}: `{example.command}` exited {status}:\n{out}"
    return out


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A directory holding what the examples name: the shipped specs and a Checkmate graph."""
    shutil.copytree(ROOT / "specs", tmp_path / "specs")
    for name in ("vgg16.json", "graph.json"):
        shutil.copy(ROOT / "tests" / "data" / "checkmate" / "chain3.json", tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _params(groups: dict[str, list[Example]]):
    params = []
    for name, examples in groups.items():
        marks = [pytest.mark.slow] if any(example.heavy for example in examples) else []
        params.append(pytest.param(examples, id=name, marks=marks))
    return params


def _grouped() -> dict[str, list[Example]]:
    """Examples of one document run in order in one scratch directory (a `show` follows the
    `solve` that wrote its file); heavy ones form a group of their own per document."""
    groups: dict[str, list[Example]] = {}
    for path in DOCUMENTS:
        for example in shell_examples(path):
            key = example.source + (" (heavy)" if example.heavy else "")
            groups.setdefault(key, []).append(example)
    for example in help_examples():
        key = "--help" + (" (heavy)" if example.heavy else "")
        groups.setdefault(key, []).append(example)
    return groups


def test_the_documents_hold_examples():
    groups = _grouped()
    assert "README.md" in groups and "--help" in groups
    assert sum(len(examples) for examples in groups.values()) >= 20


@pytest.mark.parametrize("examples", _params(_grouped()))
def test_shell_examples_run_as_shown(examples, scratch, capsys):
    for example in examples:
        out = _run(example, capsys)
        if example.expected:
            shown = [_VOLATILE.sub("[- s]", line) for line in example.expected]
            printed = [_VOLATILE.sub("[- s]", line) for line in out.splitlines()]
            assert printed == shown, f"{example.source}:{example.line}: `{example.command}` printed\n{out}"


def _python_blocks():
    params = []
    for path in DOCUMENTS:
        for start, block in _fenced_blocks(path, "python"):
            params.append(pytest.param("\n".join(block), id=f"{path.relative_to(ROOT)}:{start}"))
    return params


@pytest.mark.parametrize("code", _python_blocks())
def test_python_examples_run(code, scratch):
    script = scratch / "example.py"
    script.write_text(code)
    runpy.run_path(str(script), run_name="__main__")
