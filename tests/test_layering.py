"""Data flows one way through monetdsl's packages.

trace -> lowering -> costs -> search -> planning -> runtime: each stage imports only from the stages
before it and from the foundation (the IR, its grammar, units, errors, the catalogue...),
which imports no stage. Every import counts, those inside functions too (a lazy import is
a cycle all the same). The commands, the CLI and the package's own front sit on top.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "monetdsl"

#: the stages, in the order data flows through them
STAGES = ("tracing", "lowering", "costs", "search", "planning", "runtime")
#: what every stage may use; it uses no stage
FOUNDATION = frozenset({"errors", "units", "io", "ir", "grammar", "graph", "validate", "options", "catalogue", "synth",
                        "importers", "models", "slicing"})
#: above every stage: they may import anything
TOP = frozenset({"commands", "cli", "__main__", "__init__"})


def _unit(parts: tuple[str, ...]) -> str:
    """The package (or top-level module) a dotted ``monetdsl.x.y`` name belongs to."""
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, package: Path = PACKAGE):
    """(importing unit, imported unit, line) for every monetdsl import in ``path``, a
    module of ``package``."""
    rel = path.relative_to(package.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    home = rel.parts[:-1]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = home[: len(home) - node.level + 1] + (tuple(node.module.split(".")) if node.module else ())
            else:
                target = tuple((node.module or "").split("."))
            if target[0] != "monetdsl":
                continue
            for alias in node.names:  # "from X import name": name may be a module of X
                candidate = package.parent.joinpath(*target, alias.name)
                named = candidate.is_dir() or candidate.with_suffix(".py").is_file()
                yield _unit(parts), _unit(target + (alias.name,) if named else target), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                target = tuple(alias.name.split("."))
                if target[0] == "monetdsl":
                    yield _unit(parts), _unit(target), node.lineno


def _allowed(source: str, target: str) -> bool:
    if not {source, target} <= set(STAGES) | FOUNDATION | TOP:
        return False  # a package nobody placed: place it first (test_every_package_is_placed)
    if source == target or source in TOP:
        return True
    if target in TOP:
        return False
    if source in FOUNDATION:
        return target in FOUNDATION
    if target in FOUNDATION:
        return True
    return STAGES.index(target) < STAGES.index(source)


def test_every_package_is_placed():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if (p.suffix == ".py" or (p / "__init__.py").exists())}
    units = {"__init__" if u == "__init__" else u for u in units}
    assert units <= set(STAGES) | FOUNDATION | TOP, units - set(STAGES) - FOUNDATION - TOP


def test_imports_follow_the_stages():
    wrong = [f"{path.relative_to(PACKAGE.parent)}:{line}: {source} imports {target}"
             for path in sorted(PACKAGE.rglob("*.py")) for source, target, line in _imports(path)
             if not _allowed(source, target)]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_cycle(tmp_path):
    """A stage importing a later one, even inside a function, is reported."""
    module = tmp_path / "monetdsl" / "tracing" / "late.py"
    module.parent.mkdir(parents=True)
    module.write_text("def f():\n    from ..runtime import plan\n    return plan\n")
    found = [(s, t) for s, t, _ in _imports(module, tmp_path / "monetdsl")]
    assert found == [("tracing", "runtime")] and not _allowed("tracing", "runtime")
