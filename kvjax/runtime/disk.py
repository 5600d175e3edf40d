"""The disk tier's file: an anonymous file in the chosen directory, its whole size reserved up
front, mapped as a numpy array. A disk that cannot hold the quota is refused at construction,
never discovered later as a crash (a write into a sparse file's hole on a full disk is a SIGBUS).
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile

import numpy as np

__all__ = ["new_disk_tier"]

_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def new_disk_tier(directory, shape: tuple[int, ...], dtype: np.dtype):
    """(file, memmap) of `shape` and `dtype` in `directory`, its bytes reserved.

    Raises:
        OSError: the disk cannot hold the tier, naming the bytes needed and free.
    """
    num_bytes = math.prod(shape) * np.dtype(dtype).itemsize
    # Anonymous: removed by the OS once closed, so nothing is left in the directory.
    file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115  (the caller closes it)
    try:
        _reserve(file.fileno(), num_bytes, directory)
        return file, np.memmap(file, dtype=dtype, mode="w+", shape=shape)
    except BaseException:
        file.close()
        raise


def _reserve(fd: int, num_bytes: int, directory) -> None:
    try:
        os.posix_fallocate(fd, 0, num_bytes)
    except OSError as error:
        if error.errno in _NO_ROOM:
            raise _no_room(num_bytes, directory) from error
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # A filesystem without fallocate: at least check that the bytes are free now.
        if shutil.disk_usage(directory).free < num_bytes:
            raise _no_room(num_bytes, directory) from error


def _no_room(num_bytes: int, directory) -> OSError:
    free = shutil.disk_usage(directory).free
    return OSError(
        errno.ENOSPC,
        f"the disk tier needs {num_bytes} bytes in {directory}; {free} are free: lower "
        "disk_pages or disk_bytes, or choose another disk_dir",
    )
