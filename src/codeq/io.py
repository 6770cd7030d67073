"""Files written whole or not at all: the one atomic writer every file of the project goes through."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, content: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Write ``content`` to ``path`` so that ``path`` holds either its old content or all of the new.

    The data goes to a temporary file beside ``path``, is flushed and fsynced, and is renamed over ``path``. On any
    failure (a full disk, a quota, a folder made read-only, an exception in ``content``) the temporary file is
    removed, ``path`` is left as it was and the error is raised again; a failure of the file system is always an
    OSError naming ``path`` (``torch.save`` reports a full disk as a RuntimeError raised while handling it).
    Permissions follow the umask, as for any file the user writes (``mkstemp`` alone would make it private, 0600).
    Missing parent folders are created.

    Args:
        path: the file to write.
        content: bytes, text (written as UTF-8), or a function that writes into the binary file object it is
            given (``lambda file: torch.save(state, file)``).

    Raises:
        OSError: the file cannot be written; ``path`` is unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from error
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, "wb") as file:
            if isinstance(content, str):
                file.write(content.encode())
            elif isinstance(content, bytes):
                file.write(content)
            else:
                content(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        cause = file_system_error(error)
        if cause is None or cause.errno is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from error


def file_system_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: itself, or one it was raised while handling (its cause or context)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def current_umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
