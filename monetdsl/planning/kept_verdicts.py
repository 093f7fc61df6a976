"""The lowering's verdicts on what autograd saves, kept between processes beside the
captured step.

Lowering a schedule checks, for each op that may run in a stretch under autograd, what
PyTorch's autograd saves when the op runs on meta tensors
(:func:`monetdsl.lowering.autograd_saves.saves_only`). Some meta kernels are written in
Python and importing them imports TorchDynamo (one to several seconds), which was most
of a warm plan once the captured step itself was kept. The verdicts are plain booleans,
so they are kept as JSON, one file per captured step (named by its capture key,
:func:`monetdsl.tracing.kept_captures.capture_key`), each under the lowering's
description of the step (:func:`~monetdsl.lowering.autograd_saves.saves_key`: the op's
calls, the layouts of its reads, its writes and what it may save).

The file as a whole is valid for one torch version and one version of the code that
builds the steps (the sources of :mod:`monetdsl.lowering` and :mod:`monetdsl.catalogue`):
a file written under another, damaged (its checksum line), of another format or for
another capture key is ignored, and the lowering checks every op again and rewrites it.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from ..io import read_checked_json, write_checked_json

__all__ = ["FORMAT", "adopt_autograd_verdicts", "keep_autograd_verdicts", "code_stamp"]

#: version of the files' contents; files of another version are not read
FORMAT = 1


def _path(directory: Path, key: str) -> Path:
    return directory / f"{key[:24]}-v{FORMAT}.autograd.json"


@functools.lru_cache(maxsize=1)
def code_stamp() -> str:
    """The torch version and a digest of the code the verdicts depend on (the steps the
    lowering builds and the catalogue's implementations)."""
    digest = hashlib.sha256(torch.__version__.encode())
    package = Path(__file__).resolve().parent.parent
    for folder in ("lowering", "catalogue"):
        for source in sorted((package / folder).glob("*.py")):
            digest.update(source.name.encode())
            digest.update(source.read_bytes())
    return f"torch {torch.__version__}; {digest.hexdigest()[:16]}"


def adopt_autograd_verdicts(directory: Path | None, key: str | None) -> dict[str, bool] | None:
    """The verdicts kept under the capture key ``key`` (an empty dict when there are none
    that can be trusted), to pass to :func:`monetdsl.lowering.program.lower`; None when
    nothing is kept (no directory or no key): the lowering then checks every op."""
    if directory is None or key is None:
        return None
    data = read_checked_json(_path(directory, key))
    if data is None or data.get("format") != FORMAT or data.get("key") != key or data.get("code") != code_stamp():
        return {}
    verdicts = data.get("verdicts")
    if not isinstance(verdicts, dict):
        return {}
    return {k: v for k, v in verdicts.items() if isinstance(k, str) and isinstance(v, bool)}


def keep_autograd_verdicts(directory: Path | None, key: str | None, verdicts: dict[str, bool] | None,
                           adopted: int) -> None:
    """Write ``verdicts`` under the capture key ``key`` when the lowering added any to the
    ``adopted`` ones read back (their count); a directory that cannot be written is
    skipped (the file only saves time)."""
    if directory is None or key is None or verdicts is None or len(verdicts) <= adopted:
        return
    try:
        write_checked_json(_path(directory, key), {"format": FORMAT, "key": key, "code": code_stamp(), "verdicts": verdicts})
    except OSError:
        pass
