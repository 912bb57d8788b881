"""One writer per folder: an exclusive, non-blocking ``flock`` on a lock file inside it.

Both a shard build (``pipelines.runner``: ``OUTPUT/.distillkit.lock``) and a training run
(``pipelines.train_cli``: ``OUT/.lock``, held by rank 0) write many files into one folder over minutes
to days; a second process writing the same folder would mix or delete the first one's files. The lock
lives as long as the holder's file descriptor: released when the block ends and, because the kernel
drops ``flock`` locks with the process, also when the holder is killed, so no stale lock ever needs
removing by hand. Here, at the package root, so that ``pipelines`` and ``train`` share it without
either importing the other's internals.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# errno values of a filesystem that has no (working) flock: NFS without lockd, Lustre without -o flock.
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class FolderBusy(Exception):
    """Another process holds the folder's lock; the message names the folder."""


@contextmanager
def folder_lock(folder: Path, lock_name: str, what: str = "process") -> Iterator[bool]:
    """Hold an exclusive lock on ``folder`` (through ``folder/lock_name``) for the block.

    On a filesystem without file locks the block still runs, unguarded, after a warning: refusing to work
    there would make such a filesystem unusable, and one writer per folder is the common case anyway.

    Args:
        folder: an existing folder.
        lock_name: the lock file's name inside ``folder`` (created if missing; a holder that removes it, as a
            refused ``train`` does with the folder it had just made, makes a process that opened it before
            the removal find it gone once locked, and refuse, so two processes never hold two files).
        what: what writes the folder, for the warning (``build``, ``run``).

    Yields:
        True when the lock is held, False on a filesystem without locks.

    Raises:
        FolderBusy: another process holds the lock.
        OSError: the lock file cannot be created (a read-only folder, say).
    """
    path = folder / lock_name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
            if not _still_at(fd, path):
                # The file was removed after we opened it (a refused ``train`` takes away the folder it had
                # just made): our lock guards a file nobody else will open, so it guards nothing.
                raise FolderBusy(str(folder))
        except BlockingIOError:
            raise FolderBusy(str(folder)) from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            log.warning("%s: this filesystem has no file locks (%s); nothing stops a second %s in this folder",
                        folder, exc.strerror or exc, what)
        yield locked
    finally:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _still_at(fd: int, path: Path) -> bool:
    """Whether the open lock file ``fd`` is still the file at ``path`` (same device and inode)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)
