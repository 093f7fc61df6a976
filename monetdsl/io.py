"""Writing files without ever losing what a user wrote, or harming what is not a file.

Outputs are written atomically (a temporary file in the same folder, then
``os.replace``), so a crash never leaves half a schedule. A schedule monetdsl writes
carries a checksum comment; an existing file is overwritten only while its checksum still
matches (nobody edited it). Anything else already at the target is first moved to a
numbered backup (``name.bak``, ``name.bak.1``, ...).

Only regular files are ever renamed, backed up or replaced. Anything else at the target
(``/dev/null``, ``/dev/stdout``, a pipe, a terminal, ``/dev/full``) is written to as a
stream, in place: replacing ``/dev/null`` with a regular file would break the machine.
A FIFO nobody reads is refused rather than waited on; one with a reader is not opened
before the work is done (closing it would hand its reader an end of file).

:func:`check_output` answers, before a long piece of work, whether its output can be
written there at all (the folder exists, is a folder, accepts a new file; the target is
not a directory), so that a bad ``-o`` costs nothing. Failures raise
:class:`~monetdsl.errors.OutputError`.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import Diagnostic, MonetError, OutputError

__all__ = [
    "read_input",
    "Written",
    "check_output",
    "is_stream",
    "write_output",
    "atomic_write",
    "with_checksum",
    "checksum_intact",
    "write_checked_json",
    "read_checked_json",
]

_MARK = "# checksum "
#: paths that name an open file descriptor of this process: always written as streams
_DESCRIPTOR = re.compile(r"^/(dev/(stdout|stderr|fd/\d+)|proc/(self|thread-self|\d+)/fd/\d+)$")


@dataclass(frozen=True)
class Written:
    """Where an output went: ``backup`` is the old file's new name, if one was kept;
    ``stream`` is True when the target was not a regular file and was written in place."""

    path: Path
    backup: Path | None = None
    stream: bool = False


def _error(path, message: str, flag: str | None) -> OutputError:
    return OutputError(Diagnostic(f"{flag + ' ' if flag else ''}{path}: {message}", "monetdsl"))


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def is_stream(path: Path) -> bool:
    """True when ``path`` exists and is not a regular file, or names a descriptor."""
    if _DESCRIPTOR.match(os.path.abspath(path)):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def read_input(path: str | Path) -> str:
    """The text of the input file at ``path``, or a :class:`MonetError` saying why not.

    Only regular files are read: the kind is checked before opening, because opening a
    FIFO waits for a writer that may never come, and a device may never end.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MonetError(Diagnostic(f"no such file: {path}", str(path))) from None
    except OSError as exc:
        raise MonetError(Diagnostic(f"cannot read {path}: {_reason(exc)}", str(path))) from None
    if stat.S_ISDIR(mode):
        raise MonetError(Diagnostic(f"{path} is a directory, not a file", str(path)))
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
        raise MonetError(Diagnostic(f"{path} is {kind}; monetdsl reads its inputs from regular files", str(path)))
    try:
        data = Path(path).read_bytes()
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise MonetError(Diagnostic(f"not UTF-8 text: byte 0x{data[exc.start]:02x} cannot start or continue a character",
                                    str(path), line, column)) from None
    except OSError as exc:
        raise MonetError(Diagnostic(f"cannot read {path}: {_reason(exc)}", str(path))) from None


def check_output(path: str | Path, *, flag: str | None = "-o", stdout_is_json: bool = False) -> Path:
    """Raise :class:`OutputError` unless ``path`` can be written; return it as a Path.

    A stream target (a device, a pipe) must accept being opened for writing. A FIFO is
    only checked for permission: opening and closing it now would end a reader such as
    ``cat`` before anything is written (one without a reader is refused when written).
    A regular target needs a folder that exists and takes a new file (tried with a
    temporary file, which also catches read-only file systems and folders root may not
    write to, such as ``/proc``). ``stdout_is_json``: the command prints one JSON object
    on stdout, so an output that is this process's stdout is refused.
    """
    path = Path(path)
    if str(path) == "" or path.name in ("", ".", ".."):
        raise _error(path, "names a folder, not a file", flag)
    if stdout_is_json and _own_descriptor(path) == 1:
        raise _error(path, "is standard output, which --json keeps for its one JSON object; write to a file", flag)
    if is_stream(path):
        if _own_descriptor(path) is None and stat.S_ISFIFO(os.stat(path).st_mode):
            if not os.access(path, os.W_OK):
                raise _error(path, "cannot be opened for writing: permission denied", flag)
            return path
        _open_stream(path, flag).close()
        return path
    if path.is_dir():
        raise _error(path, "is a directory; give a file name", flag)
    target = Path(os.path.realpath(path))  # a link to a file: the file is replaced, the link kept
    folder = target.parent
    if not folder.exists():
        raise _error(path, f"the folder {folder} does not exist", flag)
    if not folder.is_dir():
        raise _error(path, f"{_first_non_folder(folder)} is not a folder", flag)
    if target.exists() and not (os.stat(target).st_mode & 0o222 and os.access(target, os.W_OK)):
        # Replacing goes through a rename, which a read-only file does not stop; its mode says
        # the owner wants it kept, so it is refused rather than replaced.
        raise _error(path, "is read-only; make it writable or choose another file", flag)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _error(path, f"the folder {folder} takes no new files ({_reason(exc)})", flag) from None
    os.close(fd)
    os.unlink(probe)
    return path


def _first_non_folder(folder: Path) -> Path:
    for parent in [*reversed(folder.parents), folder]:
        if parent.exists() and not parent.is_dir():
            return parent
    return folder


def _own_descriptor(path: Path) -> int | None:
    """The descriptor of this process that ``path`` names (``/dev/stdout`` is 1), if any."""
    match = _DESCRIPTOR.match(os.path.abspath(path))
    if match is None:
        return None
    text = match.group(0)
    if text in ("/dev/stdout", "/dev/stderr"):
        return 1 if text == "/dev/stdout" else 2
    owner = match.group(3)
    if owner is not None and owner not in ("self", "thread-self", str(os.getpid())):
        return None  # another process's descriptor: opened like any stream
    return int(text.rsplit("/", 1)[1])


def _open_stream(path: Path, flag: str | None, binary: bool = False):
    """Open a device or pipe for appending, without blocking on a FIFO that has no reader.

    A path naming one of this process's own descriptors (``/dev/stdout``) gets a duplicate
    of it, which shares its position: reopening would write from the start of a file that
    stdout was redirected to, over what is printed there."""
    own = _own_descriptor(path)
    if own is not None:
        try:
            fd = os.dup(own)
        except OSError as exc:
            raise _error(path, f"cannot be written: {_reason(exc)}", flag) from None
        return os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise _error(path, "is a FIFO that no program is reading; start the reader first", flag) from None
        raise _error(path, f"cannot be opened for writing: {_reason(exc)}", flag) from None
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)  # blocking writes from here on
    return os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")


def write_output(path: str | Path, text: str | bytes, *, checksum: bool = False, flag: str | None = "-o") -> Written:
    """Write ``text`` (or bytes, such as an image) to ``path``: in place to a stream,
    atomically to a regular file.

    An existing regular file that holds anything but ``text`` (or, with ``checksum``,
    anything but an unedited monetdsl file) is kept as a numbered backup first.
    ``checksum`` appends the line that marks the file as unedited monetdsl output.
    """
    path = Path(path)
    if checksum:
        text = with_checksum(text)
    binary = isinstance(text, bytes)
    if is_stream(path):
        sys.stdout.flush()  # what this process printed comes first if the stream is its stdout
        try:
            with _open_stream(path, flag, binary) as handle:
                handle.write(text)
        except OSError as exc:
            raise _error(path, f"writing failed: {_reason(exc)}", flag) from None
        return Written(path, stream=True)
    if path.is_dir():
        raise _error(path, "is a directory; give a file name", flag)
    target = Path(os.path.realpath(path))
    backup = None
    try:
        mode = _mode_for(target)  # before a backup moves the old file away
        if target.exists():
            old = target.read_bytes() if binary else target.read_text(encoding="utf-8", errors="replace")
            if old != text and not (checksum and checksum_intact(old)):
                backup = _free_backup_name(target)
                os.replace(target, backup)
        atomic_write(target, text, mode=mode)
    except OSError as exc:
        raise _error(path, f"writing failed: {_reason(exc)}", flag) from None
    return Written(path, backup)


def atomic_write(path: str | Path, text: str | bytes, *, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` in one step (readers see the old or the new file, never a mix).

    The file gets ``mode``, by default the permissions of the file it replaces (or those
    the umask gives a new one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        os.fchmod(fd, _mode_for(path) if mode is None else mode)  # not mkstemp's 0600
        with (os.fdopen(fd, "wb") if isinstance(text, bytes) else os.fdopen(fd, "w", encoding="utf-8")) as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _mode_for(path: Path) -> int:
    """The permissions a replaced file keeps, or those a new file gets under the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_checksum(text: str) -> str:
    """Append the checksum line that marks a file as unedited monetdsl output."""
    return text + f"{_MARK}{_digest(text)} (monetdsl rewrites this file only while it is unedited)\n"


def write_checked_json(path: str | Path, data) -> None:
    """Write ``data`` as compact JSON with a checksum line, atomically, creating the folder:
    the form of the entries the caches keep (:func:`read_checked_json` reads them back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, with_checksum(json.dumps(data, separators=(",", ":")) + "\n"))


def read_checked_json(path: str | Path) -> dict | None:
    """The JSON object :func:`write_checked_json` wrote at ``path``, or None when there is
    none, or it was damaged or edited since (its checksum line does not match), or it is
    not an object: a cache entry that cannot be trusted is not read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not checksum_intact(text):
        return None
    try:
        data = json.loads(text.rstrip("\n").rpartition("\n")[0])
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def checksum_intact(text: str) -> bool:
    """True when ``text`` ends with a checksum line that matches the rest of it."""
    body, _, last = text.rstrip("\n").rpartition("\n")
    if not last.startswith(_MARK):
        return False
    digest = last[len(_MARK) :].split()[0] if last[len(_MARK) :].split() else ""
    return digest == _digest(body + "\n")


def _free_backup_name(path: Path) -> Path:
    candidate = path.with_name(path.name + ".bak")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak.{n}")
        n += 1
    return candidate
