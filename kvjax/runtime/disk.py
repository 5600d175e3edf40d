"""The disk tier's file: an anonymous file in the chosen directory, its whole size reserved up
front, read and written a page at a time with `pread`/`pwrite`.

A disk that cannot hold the quota is refused at construction, never discovered later as a crash
(a write into a sparse file's hole on a full disk is a SIGBUS through a memory map). Explicit I/O
rather than a memory map also makes a failed read or write an `OSError` for the page concerned,
which the storage reports so the cache forgets those pages (`kvjax.cache.tier.PageMoveError`)
instead of serving bytes that were never written.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np

__all__ = ["DiskPages"]

_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskPages:
    """Pages of `page_shape` and `dtype` in an anonymous file of `directory`, bytes reserved.

    `read` and `write` report the pages whose I/O failed and carry on with the others;
    indexing (`disk[ids]`, `disk[ids] = pages`, `np.asarray(disk)`) raises on the first failure
    instead (for tests and debugging). Not thread-safe: the storage calls it from one thread.

    Raises:
        OSError: the disk cannot hold the tier, naming the bytes needed and free.
    """

    def __init__(self, directory, num_pages: int, page_shape: Sequence[int], dtype) -> None:
        self.shape = (num_pages, *page_shape)
        self.dtype = np.dtype(dtype)
        self.page_bytes = math.prod(page_shape) * self.dtype.itemsize
        # Anonymous: removed by the OS once closed, so nothing is left in the directory.
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115  (closed by close())
        try:
            _reserve(self._file.fileno(), num_pages * self.page_bytes, directory)
        except BaseException:
            self._file.close()
            raise

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, page_ids: Sequence[int]) -> tuple[np.ndarray, list[int]]:
        """(dtype[len(page_ids), *page_shape] the pages, positions whose read failed; their
        rows are zero)."""
        pages = np.zeros((len(page_ids), *self.shape[1:]), self.dtype)
        return pages, self.read_into(pages, page_ids)

    def read_into(self, out: np.ndarray, page_ids: Sequence[int]) -> list[int]:
        """Reads page `page_ids[i]` into `out[i]` (rows C-contiguous); returns the positions
        whose read failed (their rows zeroed)."""
        failed = []
        for position, page_id in enumerate(page_ids):
            try:
                self._read_into(out[position], page_id)
            except OSError:
                out[position] = 0
                failed.append(position)
        return failed

    def write(self, page_ids: Sequence[int], pages: np.ndarray) -> list[int]:
        """Writes `pages[i]` to page `page_ids[i]`; returns the positions whose write failed."""
        pages = np.ascontiguousarray(pages, self.dtype)
        failed = []
        for position, page_id in enumerate(page_ids):
            try:
                self._write(page_id, pages[position])
            except OSError:
                failed.append(position)
        return failed

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple):  # pages first, then within them
            pages = self[index[0]]
            return (
                pages[index[1:]]
                if np.ndim(index[0]) == 0 and not isinstance(index[0], slice)
                else pages[(slice(None), *index[1:])]
            )
        ids = np.arange(len(self))[index]
        pages, failed = self.read(np.atleast_1d(ids).tolist())
        if failed:
            failed_ids = [int(np.atleast_1d(ids)[position]) for position in failed]
            raise OSError(errno.EIO, f"reading disk pages {failed_ids} failed")
        return pages if np.ndim(ids) else pages[0]

    def __setitem__(self, index, value) -> None:
        ids = np.atleast_1d(np.arange(len(self))[index]).tolist()
        pages = np.broadcast_to(np.asarray(value, self.dtype), (len(ids), *self.shape[1:]))
        failed = self.write(ids, pages)
        if failed:
            raise OSError(errno.EIO, f"writing disk pages {[ids[i] for i in failed]} failed")

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        pages = self[:]
        return pages if dtype is None else pages.astype(dtype)

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()

    def _read_into(self, out: np.ndarray, page_id: int) -> None:
        view, offset = _bytes_of(out), page_id * self.page_bytes
        while view:
            count = os.preadv(self._file.fileno(), [view], offset)
            if count == 0:
                raise OSError(errno.EIO, f"disk page {page_id} ends early")
            view, offset = view[count:], offset + count

    def _write(self, page_id: int, page: np.ndarray) -> None:
        view, offset = _bytes_of(page), page_id * self.page_bytes
        while view:
            count = os.pwrite(self._file.fileno(), view, offset)
            view, offset = view[count:], offset + count


def _bytes_of(page: np.ndarray) -> memoryview:
    """A byte view of a contiguous page (any dtype, bfloat16 included)."""
    return memoryview(page.reshape(-1).view(np.uint8))


def _reserve(fd: int, num_bytes: int, directory) -> None:
    try:
        os.posix_fallocate(fd, 0, num_bytes)
    except OSError as error:
        if error.errno in _NO_ROOM:
            raise _no_room(num_bytes, directory) from error
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # A filesystem without fallocate: check that the bytes are free now, then size the file.
        if shutil.disk_usage(directory).free < num_bytes:
            raise _no_room(num_bytes, directory) from error
        os.ftruncate(fd, num_bytes)


def _no_room(num_bytes: int, directory) -> OSError:
    free = shutil.disk_usage(directory).free
    return OSError(
        errno.ENOSPC,
        f"the disk tier needs {num_bytes} bytes in {directory}; {free} are free: lower "
        "disk_pages or disk_bytes, or choose another disk_dir",
    )
