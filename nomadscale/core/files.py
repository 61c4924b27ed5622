"""Reading small configuration files (policies, settings, token files) safely.

Only regular files are read, and never more than ``limit`` bytes: ``/dev/zero`` would never
end, a FIFO blocks on open, and a multi-gigabyte file pasted by mistake must not be loaded.
"""

from __future__ import annotations

import stat
from pathlib import Path


def read_small_text(path: str | Path, *, limit: int) -> str:
    """UTF-8 text of the regular file ``path`` of at most ``limit`` bytes.

    Raises FileNotFoundError / IsADirectoryError / OSError as ``open`` would,
    UnicodeDecodeError for non-UTF-8 bytes, and ValueError (a one-line message) for a name
    with a NUL, a file that is not a regular file, or one larger than ``limit``.
    """
    p = Path(path)
    try:
        st = p.stat()
    except ValueError:
        raise ValueError("cannot read: invalid file name") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(str(p))
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")
    with p.open("rb") as fh:
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"file too large ({max(st.st_size, len(raw))} bytes, at most {limit})")
    return raw.decode("utf-8")
