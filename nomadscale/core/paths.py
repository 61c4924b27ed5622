"""Checking user-given paths without tracebacks.

``Path.exists()`` raises for names the OS refuses outright (a NUL byte, a name longer than
the file system allows); a user typing such a name deserves one line, not a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


def path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be used, or None when it exists."""
    text = os.fspath(path)
    shown = text if len(text) <= 80 else text[:77] + "..."
    if "\x00" in text:
        return f"{shown!r}: file names cannot contain a NUL byte"
    try:
        os.stat(text)
    except FileNotFoundError:
        return f"no such file or directory: {shown}"
    except NotADirectoryError:
        return f"no such file or directory: {shown}"
    except OSError as e:
        return f"{shown}: {e.strerror or e}"
    return None


def is_dir(path: str | os.PathLike[str]) -> bool:
    """``Path.is_dir`` that answers False instead of raising."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False
