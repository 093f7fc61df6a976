"""Where commands write: regular files atomically (with backups), anything else as a
stream, bad locations refused before the work, failed writes reported with the result.

Tests run as root in CI, where a read-only folder does not stop a write: unwritable
places are made by other means (a path under a regular file, a failing ``mkstemp``).
The real ``/dev/null`` and ``/dev/full`` are only written to, never replaced: writes to
them change nothing, and the tests check that they are still character devices.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import monetdsl.commands.solve as solve_command
import monetdsl.io as io
from monetdsl.cli import main
from monetdsl.io import checksum_intact

from .spec_files import SPECS_DIR


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny_chain.monet"
    shutil.copy(SPECS_DIR / "tiny_chain.monet", path)
    return path


@pytest.fixture
def no_search(monkeypatch):
    """Any search started fails the test: the location must be refused before the work."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the search ran before the output location was checked")

    monkeypatch.setattr(solve_command, "solve", forbidden)


def _is_char_device(path: str) -> bool:
    return stat.S_ISCHR(os.stat(path).st_mode)


@pytest.mark.parametrize("device", ["/dev/null", "/dev/stdout"])
def test_devices_are_written_in_place_never_replaced(tiny, capfd, device):
    if not os.path.exists(device):
        pytest.skip(f"no {device} here")
    before = os.stat(device, follow_symlinks=False)
    had_backup = os.path.exists(device + ".bak")
    assert main(["solve", str(tiny), "--budget", "21MiB", "-o", device, "-q"]) == 0
    after = os.stat(device, follow_symlinks=False)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert os.path.exists(device + ".bak") == had_backup
    assert _is_char_device("/dev/null")
    out = capfd.readouterr().out
    if device == "/dev/stdout":  # the schedule went to the stream itself, after what was printed
        assert "schedule for" in out and f"wrote {device}" in out


def test_a_device_that_refuses_data_still_prints_the_result(tiny, capfd):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    code = main(["solve", str(tiny), "--budget", "21MiB", "-o", "/dev/full", "--json", "-q"])
    out, err = capfd.readouterr()
    data = json.loads(out)
    assert code == 2 and data["status"] == "optimal" and "output" not in data
    assert "No space left" in data["output_error"] and "not written" in err and "Traceback" not in err
    assert _is_char_device("/dev/full")


def test_a_failed_write_after_the_work_keeps_the_result(tiny, tmp_path, capfd, monkeypatch):
    def disk_full(path, text, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "atomic_write", disk_full)
    target = tmp_path / "plan.monet"
    code = main(["solve", str(tiny), "--budget", "21MiB", "-o", str(target), "-q"])
    out, err = capfd.readouterr()
    assert code == 2 and not target.exists()
    assert "milp: optimal" in out and "wrote" not in out  # the result, printed anyway
    assert f"-o {target}: writing failed: No space left on device" in err


def test_a_fifo_is_a_stream_with_a_reader_and_refused_without_one(tiny, tmp_path, capfd):
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)
    assert main(["solve", str(tiny), "--budget", "21MiB", "-o", str(fifo), "-q"]) == 2  # nobody reads: no hang
    assert "no program is reading" in capfd.readouterr().err
    received = []
    ready = threading.Event()

    def reader():
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opens at once, before any writer
        ready.set()
        os.set_blocking(fd, True)  # a read now waits for data while a writer is open
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if chunk:
                chunks.append(chunk)
            elif chunks:  # the writer is done
                break
            else:  # no writer yet (or only the location check's brief one)
                time.sleep(0.01)
        os.close(fd)
        received.append(b"".join(chunks).decode())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    ready.wait(10)
    assert main(["solve", str(tiny), "--budget", "21MiB", "-o", str(fifo), "-q"]) == 0
    thread.join(30)
    assert received and received[0].startswith("# schedule written by monetdsl")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_fifo_reader_that_stops_at_the_first_end_of_file_gets_the_schedule(tiny, tmp_path):
    """A reader like ``cat`` ends at its first end of file: the location check must not open
    and close the FIFO before the schedule is written."""
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)
    received = []

    def reader():
        with open(fifo, "rb") as handle:  # blocks until a writer opens; read() ends at its close
            received.append(handle.read())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert main(["solve", str(tiny), "--budget", "21MiB", "-o", str(fifo), "-q"]) == 0
    thread.join(30)
    assert received and received[0].startswith(b"# schedule written by monetdsl")


def test_json_and_an_output_on_stdout_are_refused_together(tiny, capfd):
    """``--json`` promises one JSON object on stdout: a schedule written there would break it."""
    assert main(["solve", str(tiny), "--budget", "21MiB", "--json", "-o", "/dev/stdout"]) == 2
    captured = capfd.readouterr()
    assert "standard output" in captured.err and "schedule for" not in captured.out


@pytest.mark.parametrize(
    "where, message",
    [
        (lambda tmp: tmp / "missing" / "plan.monet", "does not exist"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: tmp / "tiny_chain.monet" / "plan.monet", "is not a folder"),
    ],
    ids=["missing folder", "a directory", "under a regular file"],
)
def test_bad_output_locations_are_refused_before_the_work(tiny, tmp_path, capfd, no_search, where, message):
    target = where(tmp_path)
    code = main(["solve", str(tiny), "--budget", "21MiB", "-o", str(target), "--json"])
    out, err = capfd.readouterr()
    assert code == 2 and message in err and "Traceback" not in err
    assert json.loads(out)["ok"] is False


def test_a_folder_that_takes_no_new_file_is_refused_before_the_work(tiny, tmp_path, capfd, no_search, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(io.tempfile, "mkstemp", refused)
    assert main(["solve", str(tiny), "--budget", "21MiB", "-o", str(tmp_path / "plan.monet")]) == 2
    assert "takes no new files" in capfd.readouterr().err


def test_the_default_location_is_checked_too(tmp_path, capfd, no_search):
    spec = tmp_path / "tiny_chain.monet"
    shutil.copy(SPECS_DIR / "tiny_chain.monet", spec)
    (tmp_path / "tiny_chain.schedule.monet").mkdir()
    assert main(["solve", str(spec), "--budget", "21MiB"]) == 2
    err = capfd.readouterr().err
    assert "is a directory" in err and "choose another place with -o, or pass --no-write" in err


def test_a_link_to_a_file_keeps_the_link_and_new_files_follow_the_umask(tiny, tmp_path, capfd):
    real = tmp_path / "real.monet"
    real.write_text("# my notes\n")
    real.chmod(0o640)
    link = tmp_path / "link.monet"
    link.symlink_to(real)
    assert main(["solve", str(tiny), "--budget", "21MiB", "-o", str(link), "-q"]) == 0
    assert link.is_symlink() and real.read_text().startswith("# schedule written by monetdsl")
    assert (tmp_path / "real.monet.bak").read_text() == "# my notes\n"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640  # a replaced file keeps its permissions
    fresh = tmp_path / "fresh.monet"
    assert main(["solve", str(tiny), "--budget", "21MiB", "-o", str(fresh), "-q"]) == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask


def test_import_keeps_a_backup_of_a_different_file(tmp_path, capfd):
    graph = Path(__file__).resolve().parent / "data" / "checkmate"
    source = sorted(graph.glob("*.json"))[0]
    target = tmp_path / "imported.monet"
    target.write_text("# mine\n")
    assert main(["import", "checkmate", str(source), "-o", str(target)]) == 0
    assert (tmp_path / "imported.monet.bak").read_text() == "# mine\n"
    first = target.read_text()
    assert main(["import", "checkmate", str(source), "-o", str(target)]) == 0  # the same text: no second backup
    assert target.read_text() == first and not (tmp_path / "imported.monet.bak.1").exists()


def test_trace_keeps_a_backup_of_an_existing_file(tmp_path, capfd):
    target = tmp_path / "net.monet"
    target.write_text("# hand-written\n")
    argv = ["trace", "monetdsl.models:small_cnn", "--input", "2x3x32x32", "--device", "cpu", "-o", str(target)]
    assert main(argv) == 0
    assert (tmp_path / "net.monet.bak").read_text() == "# hand-written\n"
    assert target.read_text().lstrip().startswith(("#", "network"))
    assert main(argv + ["-o", str(tmp_path / "no" / "net.monet")]) == 2  # checked before tracing


def test_inputs_must_be_regular_files(tmp_path, capfd):
    fifo = tmp_path / "spec.monet"
    os.mkfifo(fifo)
    assert main(["check", str(fifo)]) == 1  # refused by its kind, never opened: no hang
    err = capfd.readouterr().err
    assert "is a FIFO" in err and "Traceback" not in err
    assert main(["check", str(tmp_path)]) == 1
    assert "is a directory" in capfd.readouterr().err


def test_dash_is_standard_output_and_no_write_contradicts_an_output(tiny, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["solve", str(tiny), "--budget", "21MiB", "-o", "-", "-q"]) == 0
    assert capfd.readouterr().out.startswith("# schedule written by monetdsl")
    assert not (tmp_path / "-").exists()
    assert main(["solve", str(tiny), "--budget", "21MiB", "-o", "plan.monet", "--no-write"]) == 2
    assert "contradict" in capfd.readouterr().err and not (tmp_path / "plan.monet").exists()


def test_stdout_redirected_to_a_file_gets_the_schedule_and_the_report_in_order(tiny, tmp_path):
    """``-o /dev/stdout > out.txt``: the schedule is written through stdout's own
    descriptor (its position shared), so what is printed after it does not overwrite it."""
    out = tmp_path / "out.txt"
    env = dict(os.environ, PYTHONPATH=str(SPECS_DIR.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(out, "w") as handle:
        done = subprocess.run([sys.executable, "-m", "monetdsl", "solve", str(tiny), "--budget", "21MiB", "-o", "/dev/stdout", "-q"],
                              stdout=handle, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    end = "(monetdsl rewrites this file only while it is unedited)\n"  # the checksum line's end
    schedule, _, report = text.partition(end)
    assert schedule.startswith("# schedule written by monetdsl") and checksum_intact(schedule + end)
    assert report.startswith("milp: optimal") and report.rstrip().endswith("wrote /dev/stdout")


def test_a_read_only_file_is_not_replaced(tiny, tmp_path, capfd, no_search):
    target = tmp_path / "keep.monet"
    target.write_text("mine\n")
    target.chmod(0o444)
    assert main(["solve", str(tiny), "--budget", "21MiB", "-o", str(target)]) == 2
    assert "is read-only" in capfd.readouterr().err
    assert target.read_text() == "mine\n"
