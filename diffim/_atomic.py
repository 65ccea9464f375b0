"""Atomic file output shared by every writer in diffim.

Outputs are written to a temporary file beside the target and renamed over it only when
complete, so a reader never sees a partial file and a failed write leaves nothing behind.
"""

import contextlib
import os
import uuid


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Open a temporary file that replaces ``path`` when the block exits without error.

    Parameters
    ----------
    path : str or os.PathLike
    mode : {"wb", "w"}
        Binary, or UTF-8 text.

    Yields
    ------
    file object
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    # O_EXCL: never clobber someone else's file; 0o666 lets the umask set the permissions
    # exactly as an ordinary open() would (mkstemp would make them 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
