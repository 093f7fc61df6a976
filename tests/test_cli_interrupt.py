"""Ctrl-C during a long search: the best schedule so far is reported and written, exit
130, no traceback; a second Ctrl-C exits at once. Real processes, real SIGINTs.

The search is the exact MILP for the least peak of the two-block GPT, which runs for
minutes before it proves its minimum; the signal is sent once its first progress line
shows the search is under way (with an incumbent: the MIP start). Progress is drawn on
terminals only, so the search's stderr is a pseudo-terminal.
"""
from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from monetdsl.cli import main
from monetdsl.grammar import load_spec
from monetdsl.search import simulate, solve

from .spec_files import SPECS_DIR

ROOT = SPECS_DIR.parent
LONG_SEARCH = [str(SPECS_DIR / "tiny_gpt.monet"), "--min-memory", "--method", "milp", "--time-limit", "300"]


def _start(tmp_path, *extra: str) -> tuple[subprocess.Popen, int]:
    """The search, its stderr a pseudo-terminal (returned: the terminal's reading end)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    terminal, stderr = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "monetdsl", "solve", *LONG_SEARCH, *extra],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
    )
    os.close(stderr)
    return process, terminal


def _read(terminal: int, timeout: float) -> str:
    """What the terminal shows within ``timeout`` seconds ("" once the process is gone)."""
    if not select.select([terminal], [], [], timeout)[0]:
        return ""
    try:
        return os.read(terminal, 65536).decode(errors="replace")
    except OSError:  # the process closed its end
        return ""


def _wait_for_progress(process: subprocess.Popen, terminal: int, timeout: float = 120.0) -> str:
    """The terminal's text until the search reports progress with an incumbent."""
    shown = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        shown += _read(terminal, 1.0)
        latest = shown.rpartition("\r")[2]
        if latest.startswith("milp: search") and "incumbent -" not in latest:
            return shown
    process.kill()
    pytest.fail("the search never reported progress: " + shown)


def test_ctrl_c_reports_and_writes_the_best_schedule_so_far(tmp_path):
    target = tmp_path / "plan.monet"
    process, terminal = _start(tmp_path, "-o", str(target))
    _wait_for_progress(process, terminal)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)  # the search's own limit is 300 s
    err = "".join(iter(lambda: _read(terminal, 0.5), ""))
    os.close(terminal)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert out.startswith("interrupted: the best schedule found so far") and f"wrote {target}" in out
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


@pytest.mark.parametrize("method", ["milp", "hybrid", "checkmate", "checkmate-lp"])
def test_a_stop_request_ends_every_searching_method_with_its_best_so_far(method):
    """Asked to stop before it starts, a search with five minutes to spend returns at once
    (the test would otherwise take those five minutes) what it has: a valid schedule."""
    spec = load_spec(SPECS_DIR / "tiny_gpt.monet")
    stop = threading.Event()
    stop.set()
    result = solve(spec, method, objective="memory", time_limit=300, stop=stop)
    assert result.status == "interrupted" and result.details["status_before_interrupt"] != "interrupted"
    assert result.message.startswith("interrupted: ")
    if result.success:
        assert simulate(spec.network, result.schedule, fingerprint=spec.fingerprint).valid
