"""Output files of ``backtest`` (``--decisions-out``, ``--plot``): checked before any work and
written only once everything succeeded, each atomically (a temporary file in the same folder,
then renamed over the target). A failure leaves no half-written file, and an output never
replaces an input (the trace, the policy) or another output.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from nomadscale.core.errors import InputError, UsageError


def same_file(a: str | Path, b: str | Path) -> bool:
    """``a`` and ``b`` name the same file (also through a symlink or a hard link)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return Path(a).resolve() == Path(b).resolve()


def check_output(option: str, path: str | Path, *, inputs: Mapping[str, str | None]) -> None:
    """Refuse ``path`` (the value of ``option``) up front when it names one of ``inputs``
    (what -> path), a folder, or a file in a folder that does not exist or cannot be written."""
    for what, src in inputs.items():
        if src is not None and same_file(path, src):
            raise UsageError(f"{option} {path}: is the {what} file; write the output elsewhere")
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {path}: is a folder; name a file in it")
    parent = p.parent
    if not parent.exists():
        raise UsageError(f"{option} {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write in {parent}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(tmp)


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_files(files: Sequence[tuple[str, str | Path, bytes]]) -> None:
    """Write every ``(option, path, content)`` (``option`` names the path in an error; may be
    empty): all to temporary files first, then each renamed over its target; if any cannot
    be written, none is."""
    temps: list[tuple[str, Path]] = []
    mode = _file_mode()
    where = ""
    try:
        for option, target, data in files:
            path = Path(target)
            where = f"{option} {path}" if option else str(path)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, mode)
    except OSError as e:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        raise InputError(f"{where}: cannot write: {e.strerror or e}") from None
    for tmp, target_path in temps:
        os.replace(tmp, target_path)
