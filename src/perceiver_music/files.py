"""Writing output files: atomically (readers never see half a file) and with the permissions
of any other program's files, 0666 less the user's umask.

Temporary files from `tempfile.mkstemp` are 0600, and safetensors' `save_file` writes 0600
too (checkpoint.save_tensors sets `default_mode()` after it); renamed into place they would
leave outputs unreadable to anyone else sharing a folder.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def umask() -> int:
    """The process's umask, read without changing it where the system allows (os.umask can only
    be read by setting it, for a moment, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """The mode a newly created file gets: 0666 less the umask."""
    return 0o666 & ~umask()


def _atomic_write(path: Path, mode: str, write: Callable[[IO[Any]], None]) -> None:
    """Write through a new temporary file beside `path`, created as any file is (0666 less the
    umask), then renamed onto `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, so readers never see half a file."""
    _atomic_write(path, "w", lambda f: f.write(text))


def atomic_save_npy(path: Path, array) -> None:
    """np.save to `path` through a temporary file."""
    import numpy as np

    _atomic_write(path, "wb", lambda f: np.save(f, array))
