"""The `monetdsl` command contract that scripts rely on."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from monetdsl.cli import main
from monetdsl.io import checksum_intact

SPECS = Path(__file__).resolve().parent.parent / "specs"


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny_chain.monet"
    shutil.copy(SPECS / "tiny_chain.monet", path)
    return path


def run_json(capsys, *argv) -> tuple[int, dict]:
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_check_spec(tiny, capsys):
    assert main(["check", str(tiny)]) == 0
    assert "ok; network tiny_chain: 21 tensors, 6 forward ops, 8 backward ops" in capsys.readouterr().out
    code, data = run_json(capsys, "check", str(tiny), "--json")
    assert (code, data) == (0, {"ok": True, "errors": []})


def test_solve_writes_a_schedule_that_check_accepts(tiny, capsys):
    code, data = run_json(capsys, "solve", str(tiny), "--json")
    assert code == 0
    assert set(data) >= {"status", "method", "peak_bytes", "compute", "baseline_compute", "overhead", "solve_seconds", "output"}
    assert data["status"] == "optimal" and data["peak_bytes"] <= 21 * 2**20
    out = Path(data["output"])
    assert out == tiny.with_name("tiny_chain.schedule.monet")
    text = out.read_text()
    assert text.startswith("# schedule written by monetdsl")
    assert f'schedule for "tiny_chain.monet" fingerprint' in text  # relative to the schedule's folder
    assert f"predicted peak" in text and checksum_intact(text)
    code, check = run_json(capsys, "check", str(tiny), "--schedule", str(out), "--json")
    assert code == 0 and check["ok"] is True
    assert check["peak_bytes"] == data["peak_bytes"] and check["compute"] == data["compute"]
    assert check["overhead"] == pytest.approx(data["overhead"])


def test_solve_infeasible_budget(tiny, capsys):
    code, data = run_json(capsys, "solve", str(tiny), "--budget", "15MiB", "--json")
    assert code == 1
    assert data["status"] == "infeasible" and data["min_feasible_budget"] > 15 * 2**20
    assert not tiny.with_name("tiny_chain.schedule.monet").exists()
    assert main(["solve", str(tiny), "--budget", "15MiB"]) == 1
    assert "the minimum feasible budget is exactly" in capsys.readouterr().err


def test_solve_options(tiny, tmp_path, capsys):
    out = tmp_path / "plan.monet"
    code, data = run_json(capsys, "solve", str(tiny), "--method", "store-all", "--budget", "1GiB", "-o", str(out), "--json")
    assert code == 0 and data["method"] == "store-all" and data["overhead"] == 0.0 and out.exists()
    code, data = run_json(capsys, "solve", str(tiny), "--max-overhead", "200%", "--budget", "1GiB", "--no-write", "--json")
    assert code == 0 and "output" not in data
    assert main(["solve", str(tiny), "--method", "magic"]) == 2  # a usage error
    assert "unknown method 'magic'" in capsys.readouterr().err
    assert main(["solve", str(tiny), "--budget", "12 parsecs"]) == 2
    assert "--budget" in capsys.readouterr().err


def test_solve_never_overwrites_the_spec_or_an_edited_schedule(tiny, capsys):
    before = tiny.read_text()
    assert main(["solve", str(tiny), "-o", str(tiny)]) == 2
    assert "refusing to write the schedule over the spec" in capsys.readouterr().err
    assert tiny.read_text() == before
    out = tiny.with_name("tiny_chain.schedule.monet")
    assert main(["solve", str(tiny)]) == 0
    first = out.read_text()
    assert main(["solve", str(tiny)]) == 0  # unedited: rewritten in place, no backup
    assert not out.with_name(out.name + ".bak").exists()
    edited = first.replace("  stage loss.backward", "  stage loss.backward  # my note")
    out.write_text(edited)
    assert main(["solve", str(tiny)]) == 0
    assert out.with_name(out.name + ".bak").read_text() == edited
    assert "kept it as" in capsys.readouterr().err
    out.write_text(edited + "# again\n")
    assert main(["solve", str(tiny)]) == 0
    assert out.with_name(out.name + ".bak.1").read_text() == edited + "# again\n"


def test_check_an_edited_schedule(tiny, capsys):
    assert main(["solve", str(tiny), "--budget", "1GiB", "--method", "store-all"]) == 0
    out = tiny.with_name("tiny_chain.schedule.monet")
    text = out.read_text()
    # drop h3 from the forward keep list: the loss backward then finds no h3
    broken = text.replace("keep a1, a2, h3", "keep a1, a2")
    assert broken != text
    out.write_text(broken)
    capsys.readouterr()
    code, data = run_json(capsys, "check", str(tiny), "--schedule", str(out), "--json")
    assert code == 1 and data["ok"] is False
    error = next(e for e in data["errors"] if "needs h3" in e["message"])
    assert "needs h3, which is not present" in error["message"]
    assert error["file"] == str(out) and error["line"] == text.splitlines().index("  stage loss.backward  # peak 22.00 MiB") + 1
    # a valid edit over budget is valid but breaks the constraints
    out.write_text(text)
    assert main(["check", str(tiny), "--schedule", str(out)]) == 1
    captured = capsys.readouterr()
    assert "valid, but it breaks the spec's constraints" in captured.out
    assert "exceeds the budget" in captured.err


def test_schedule_for_another_spec_is_refused(tiny, tmp_path, capsys):
    assert main(["solve", str(tiny)]) == 0
    capsys.readouterr()
    schedule = str(tiny.with_name("tiny_chain.schedule.monet"))
    other = tmp_path / "other.monet"
    other.write_text(tiny.read_text().replace("a1.mask u1[1024,512] time 24us", "a1.mask u1[1024,512] time 24us workspace 1KiB"))
    code, data = run_json(capsys, "check", str(other), "--schedule", schedule, "--json")
    assert code == 1 and "made for another spec" in data["errors"][0]["message"]
    assert data["errors"][0]["line"] == 5  # the `schedule for` line, after four comment lines
    # other times, the same graph: the schedule is checked, its compute taken from this spec
    retimed = tmp_path / "retimed.monet"
    retimed.write_text(tiny.read_text().replace("time 300us", "time 301us"))
    code, data = run_json(capsys, "check", str(retimed), "--schedule", schedule, "--json")
    assert code == 0 and not data["errors"]


def test_show(tiny, capsys):
    assert main(["solve", str(tiny)]) == 0
    capsys.readouterr()
    assert main(["show", str(tiny.with_name("tiny_chain.schedule.monet"))]) == 0
    out = capsys.readouterr().out
    assert "stage" in out and "recompute" in out and "memory timeline" in out and "<- peak" in out
    assert out.count("bwd ") == 8 and out.count("fwd ") == 6


def test_help_explains_itself_with_examples():
    for argv in (["--help"], ["check", "--help"], ["solve", "--help"], ["show", "--help"]):
        result = subprocess.run([sys.executable, "-m", "monetdsl", *argv], capture_output=True, text=True)
        assert result.returncode == 0
        assert "example" in result.stdout and "monetdsl " in result.stdout
