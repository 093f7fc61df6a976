"""The command line around the searching methods: min-memory, infeasible budgets, time
limits, progress, sweeps, and bad input (a clear message, never a traceback)."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from monetdsl.cli import main
from monetdsl.grammar import load_spec
from monetdsl.grammar.parser import parse_spec
from monetdsl.search.progress import StderrProgress
from monetdsl.search.solve import solve
from monetdsl.synth import resnet_stack, transformer_stack

ROOT = Path(__file__).resolve().parent.parent
RESBLOCK = str(ROOT / "specs" / "resblock.monet")
TRANSFORMER = str(ROOT / "specs" / "transformer_block.monet")
TINY = str(ROOT / "specs" / "tiny_chain.monet")
RESBLOCK_MIN = 155322368  # proved by test_milp_specs.py::test_minimum_budget_is_exact


def run_cli(capfd, *argv):
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, out, err


def test_infeasible_budget_exits_1_with_the_exact_minimum(capfd):
    code, out, err = run_cli(capfd, "solve", RESBLOCK, "--budget", "100MiB", "--method", "milp", "--no-write", "--json")
    assert code == 1
    data = json.loads(out)  # stdout holds exactly one JSON object (no HiGHS banner)
    assert data["status"] == "infeasible"
    assert data["min_feasible_budget"] == RESBLOCK_MIN and data["min_feasible_budget_exact"] is True
    code, out, err = run_cli(capfd, "solve", RESBLOCK, "--budget", "100MiB", "--method", "milp", "--no-write")
    assert code == 1 and f"exactly 148.13 MiB ({RESBLOCK_MIN} B)" in err and "Traceback" not in err


def test_min_memory_writes_the_schedule_and_reports_the_exact_budget(capfd, tmp_path):
    target = tmp_path / "plan.monet"
    code, out, err = run_cli(capfd, "solve", RESBLOCK, "--min-memory", "-o", str(target), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["status"] == "optimal" and data["peak_bytes"] == RESBLOCK_MIN
    assert data["min_feasible_budget"] == RESBLOCK_MIN and data["min_feasible_budget_exact"] is True
    code, out, err = run_cli(capfd, "check", RESBLOCK, "--schedule", str(target), "--json")
    assert code == 0 and json.loads(out)["peak_bytes"] == RESBLOCK_MIN


def test_min_memory_needs_a_searching_method(capfd):
    code, out, err = run_cli(capfd, "solve", RESBLOCK, "--min-memory", "--method", "chen-sqrt", "--no-write")
    assert code == 2 and "needs a method that searches" in err


@pytest.fixture(scope="module")
def resnet4(tmp_path_factory):
    path = tmp_path_factory.mktemp("specs") / "resnet4.monet"
    path.write_text(resnet_stack(4))
    return str(path)


@pytest.fixture(scope="module")
def transformer2(tmp_path_factory):
    path = tmp_path_factory.mktemp("specs") / "transformer2.monet"
    path.write_text(transformer_stack(2))
    return str(path)


def test_short_time_limit_returns_the_incumbent_with_a_gap(capfd, resnet4, tmp_path):
    """Too short to prove optimality: the best schedule found, its gap, exit 0."""
    target = tmp_path / "plan.monet"
    code, out, err = run_cli(
        capfd, "solve", resnet4, "--budget", "300MiB", "--method", "milp", "--time-limit", "1", "-o", str(target), "--json"
    )
    assert code == 0
    data = json.loads(out)
    assert data["status"] == "time_limit"
    assert 0 < data["gap"] < 1 and data["lower_bound"] <= data["compute"]
    assert data["peak_bytes"] <= 300 * 2**20 and target.exists()


def test_time_limit_before_any_schedule_and_no_heuristic_fits(capfd, transformer2):
    """Too short to find anything and no heuristic fits: a clear message, exit 1, nothing written."""
    budget = str(380 * 2**20)  # feasible (the minimum is 246 MiB) but beyond every heuristic
    code, out, err = run_cli(
        capfd, "solve", transformer2, "--budget", f"{budget}B", "--method", "milp", "--time-limit", "0.01", "--json"
    )
    assert code == 1
    data = json.loads(out)
    assert data["status"] == "time_limit" and data["peak_bytes"] is None
    # the limit ends the search while building the model or while solving it
    assert "no heuristic schedule fits" in data["message"]
    assert "output" not in data


def test_time_limit_before_any_schedule_falls_back_to_a_fitting_heuristic(resnet4):
    """The plain scipy path has no MIP start: when HiGHS finds nothing, a fitting heuristic is returned."""
    spec = parse_spec(Path(resnet4).read_text(), path=resnet4)
    result = solve(spec, "milp", memory_budget=350 * 2**20, time_limit=0.001, options={"backend": "scipy"})
    assert result.status == "time_limit" and result.success
    assert result.details.get("fallback") in ("store-all", "chen-sqrt", "chen-greedy", "revolve", "recompute-all")
    assert result.simulation.peak_bytes <= 350 * 2**20


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_rewritten_line_on_a_terminal_and_nothing_elsewhere(resnet4):
    spec = load_spec(resnet4)
    for stream, shown in ((_Terminal(), True), (io.StringIO(), False)):
        progress = StderrProgress(stream, after=0.0)
        solve(spec, "milp", memory_budget=300 * 2**20, time_limit=5, progress=progress)
        progress.close()
        text = stream.getvalue()
        assert ("milp: search" in text and "incumbent" in text and "bound" in text and "gap" in text) is shown
        assert text.count("\n") == (1 if shown else 0)  # the line is rewritten in place, ended once


def test_json_and_quiet_keep_stderr_free_of_progress(capfd, resnet4):
    args = ["solve", resnet4, "--budget", "300MiB", "--method", "milp", "--time-limit", "2.5", "--no-write"]
    for extra in (["--json"], ["--quiet"]):
        code, out, err = run_cli(capfd, *args, *extra)
        assert code == 0 and "incumbent" not in err


def test_json_stdout_is_clean_in_a_real_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "monetdsl", "solve", TRANSFORMER, "--min-memory", "--no-write", "--json"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["status"] == "optimal" and data["min_feasible_budget_exact"] is True


def test_sweep_table_json_and_plot(capfd, tmp_path):
    plot = tmp_path / "pareto.png"
    code, out, err = run_cli(
        capfd, "sweep", RESBLOCK, "--budgets", "120MiB..180MiB:30MiB", "--methods", "milp,checkmate,chen-sqrt",
        "--plot", str(plot), "--quiet",
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:7] == ["method", "budget", "status", "peak", "overhead", "solve", "s"]
    assert sum(1 for line in lines if line.startswith("milp ")) == 3
    assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert err == ""
    code, out, err = run_cli(capfd, "sweep", RESBLOCK, "--budgets", "120MiB,150MiB", "--methods", "milp,store-all", "--json")
    data = json.loads(out)
    rows = {(r["method"], r["budget"]): r for r in data["rows"]}
    assert len(rows) == 4
    assert rows["milp", 120 * 2**20]["status"] == "infeasible"
    assert rows["milp", 150 * 2**20]["status"] == "optimal" and rows["milp", 150 * 2**20]["peak_bytes"] <= 150 * 2**20
    assert rows["store-all", 150 * 2**20]["status"] == "infeasible"
    assert "sweep: milp at" in err  # per-run progress on stderr, not stdout


@pytest.mark.parametrize("command", ["check", "solve", "sweep", "show"])
def test_help_of_every_command_renders(capfd, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out, err = capfd.readouterr()
    assert exit_info.value.code == 0 and "usage: monetdsl" in out and "example" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sweep", TINY, "--budgets", "10MiB..5MiB:1MiB"], "must go up by a positive step"),
        (["sweep", TINY, "--budgets", "5MiB..10MiB"], "needs a step, e.g. 5MiB..10MiB:500KiB"),
        (["sweep", TINY, "--budgets", "1GiB..9GiB"], "needs a step, e.g. 1GiB..9GiB:800MiB"),
        (["sweep", TINY, "--budgets", "5 apples"], "--budgets"),
        (["sweep", TINY, "--budgets", "1B..1GiB:1B"], "more than 200 budgets"),
        (["sweep", TINY, "--budgets", "20MiB", "--methods", "milp,nope"], "unknown method 'nope'"),
        (["solve", TINY, "--method", "milp", "--gap", "lots", "--no-write"], "--gap"),
        (["solve", TINY, "--method", "milp", "--time-limit", "-1", "--no-write"], "--time-limit"),
        (["solve", TINY, "--method", "simplex", "--no-write"], "unknown method 'simplex'"),
    ],
)
def test_bad_input_is_a_clear_error(capfd, argv, message):
    code, out, err = run_cli(capfd, *argv)
    assert code == 2 and message in err and "Traceback" not in err  # usage errors


def test_specs_the_milp_cannot_model_are_refused_clearly(capfd, tmp_path):
    path = tmp_path / "small_inplace.monet"
    path.write_text(
        """
network n
  tensor x f32[64] input
  op a (x) -> h f32[64] time 1us
    backward reads (grad(h)) -> grad(x) time 1us
  op b (h) -> y f32[32]
    impl plain time 1us
    impl squeeze overwrites h time 1us
    backward reads (grad(y)) -> grad(h) time 1us
  output y
"""
    )
    code, out, err = run_cli(capfd, "solve", str(path), "--method", "milp", "--no-write")
    assert code == 1 and "the exact MILP cannot model this spec" in err and "smaller" in err
    code, out, err = run_cli(capfd, "solve", str(path), "--method", "chen-sqrt", "--no-write")
    assert code == 0  # the other methods still work on it
