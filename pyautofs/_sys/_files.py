"""Reading a file that someone else may have put in place: never block, never grow without bound.

A map file or an image file is opened with ``O_NONBLOCK`` and ``O_NOCTTY`` and refused
unless it is a regular file, so a FIFO or a device put where the file was cannot hang the
reader. Its size is checked before reading and again while reading (it may grow in
between), so what is read never exceeds the limit.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["read_regular_file"]

_CHUNK = 1 << 20


def read_regular_file(
    path: str | os.PathLike[str],
    limit: int,
    *,
    limit_text: str | None = None,
    too_large: type[OSError] = OSError,
) -> tuple[bytes, os.stat_result]:
    """The whole content of the regular file at ``path`` (at most ``limit`` bytes) and its
    ``fstat``.

    Anything else raises ``OSError(EINVAL, "not a regular file")``; a larger file raises
    ``too_large(EFBIG, "larger than <limit_text>")``. Both carry ``path``.
    """
    target = os.fspath(path)
    limit_text = limit_text or f"{limit} bytes"
    fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", target)
        if st.st_size > limit:
            raise too_large(errno.EFBIG, f"larger than {limit_text} ({st.st_size} bytes)", target)
        chunks = []
        size = 0
        while chunk := os.read(fd, _CHUNK):
            size += len(chunk)
            if size > limit:
                raise too_large(errno.EFBIG, f"larger than {limit_text}", target)
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks), st
