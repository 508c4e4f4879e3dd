"""File-system durability helpers shared by the WAL, the backend, repair
and snapshots.

A file created, renamed or deleted is durable only once its directory has
been fsynced too (the directory entry is data of the directory, not of the
file): every such step on the durability path ends with ``fsync_dir``.
"""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """fsync the directory ``path`` so that entries created, renamed or
    removed in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
