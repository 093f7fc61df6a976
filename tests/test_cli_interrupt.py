"""Ctrl-C during a long search: the best schedule so far is reported and written, exit
130, no traceback; a second Ctrl-C exits at once. Real processes, real SIGINTs.

The search is the exact MILP for the least peak of the two-block GPT, which runs for
minutes before it proves its minimum; the signal is sent once its first progress line
shows the search is under way (with an incumbent: the MIP start).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from monetdsl.cli import main

from .spec_files import SPECS_DIR

ROOT = SPECS_DIR.parent
LONG_SEARCH = [str(SPECS_DIR / "tiny_gpt.monet"), "--min-memory", "--method", "milp", "--time-limit", "300"]


def _start(tmp_path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "monetdsl", "solve", *LONG_SEARCH, *extra],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_progress(process: subprocess.Popen, timeout: float = 120.0) -> list[str]:
    """stderr lines until the search reports progress (it prints after a second)."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("milp: search") and "incumbent -" not in line:
            return lines
    process.kill()
    pytest.fail("the search never reported progress: " + "".join(lines))


def test_ctrl_c_reports_and_writes_the_best_schedule_so_far(tmp_path):
    target = tmp_path / "plan.monet"
    process = _start(tmp_path, "-o", str(target), "--json")
    _wait_for_progress(process)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    waited = time.monotonic() - sent
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    data = json.loads(out)
    assert data["status"] == "interrupted" and data["output"] == str(target)
    assert data["message"].startswith("interrupted: the best schedule found so far")
    assert data["min_feasible_budget_exact"] is False
    assert waited < 60, f"the search took {waited:.0f} s to stop"
    # what was written is a valid schedule, and it replays to the reported peak
    assert main(["check", str(SPECS_DIR / "tiny_gpt.monet"), "--schedule", str(target), "--json"]) == 0


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """The search above stops within a second of the first signal; here the work after it
    never ends, so only the second signal can end the process."""
    script = (
        "import os, signal, time\n"
        "from monetdsl.commands.interrupt import stop_on_interrupt\n"
        "with stop_on_interrupt() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    while not stop.is_set():\n"
        "        time.sleep(0.01)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(60)\n"
        "print('not reached')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 130 and done.stdout == ""
    assert "interrupted; stopping" in done.stderr and "interrupted again; exiting now" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - start < 30


def test_ctrl_c_outside_a_search_exits_130_without_a_traceback(monkeypatch, capsys):
    import monetdsl.commands.check as check_command

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(check_command, "load_spec", interrupted)
    assert main(["check", str(SPECS_DIR / "tiny_chain.monet")]) == 130
    assert "interrupted" in capsys.readouterr().err
