"""Turn whatever a request handler raises into a FUSE errno, and log it.

A request must never take the server down: ext4 errors become their errno,
`Corrupt` additionally gets one structured log line naming what, where and
why, and anything unexpected is logged with its traceback and answered EIO.
`FuseError` is the one exception the operations layer lets out; each backend
turns it into its own reply (an out header's error, pyfuse3.FUSEError).
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from ext4box.ext4.format.errors import Corrupt, Ext4Error, NoData, NotFound, Unsupported
from ext4box.log import get_logger

log = get_logger("ext4box.fuse")

P = ParamSpec("P")
R = TypeVar("R")

# Expected answers, not incidents: logged at debug only.
_QUIET = (NotFound, NoData)
_DEVICE_ERRNOS_PASSED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


class FuseError(Exception):
    """The answer to a request is this errno (positive)."""

    __slots__ = ("errno",)

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err

    def __str__(self) -> str:
        return errno.errorcode.get(self.errno, str(self.errno))


def to_fuse_error(err: BaseException, op: str) -> FuseError:
    """The FuseError to answer for `err`, after logging it as it deserves."""
    if isinstance(err, FuseError):
        return err
    if isinstance(err, Corrupt):
        log.error("corrupt", what=err.what, where=err.where, why=err.why, op=op)
        return FuseError(err.errno)
    if isinstance(err, Ext4Error):
        if isinstance(err, _QUIET):
            log.debug("request failed", op=op, error=str(err))
        elif isinstance(err, Unsupported):
            log.warning(
                "unsupported", feature=err.feature, where=err.where, op=op, detail=err.detail
            )
        else:
            log.info("request failed", op=op, error=str(err), errno=err.errno)
        return FuseError(err.errno)
    if isinstance(err, OSError) and err.errno is not None:
        # The device (image file) refused I/O. A full host disk is worth telling the
        # user as such; anything else is an I/O error of the device.
        log.error("device_io_failed", op=op, errno=errno.errorcode.get(err.errno, err.errno),
                  error=err.strerror)
        return FuseError(err.errno if err.errno in _DEVICE_ERRNOS_PASSED else errno.EIO)
    log.error("unexpected error", op=op, exc_info=err)
    return FuseError(errno.EIO)


def fuse_errors(op: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a handler so it only ever raises `FuseError`."""

    def decorate(handler: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(handler)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return handler(*args, **kwargs)
            except FuseError:
                raise
            except Exception as err:  # the server must survive any request
                raise to_fuse_error(err, op) from None

        return guarded

    return decorate
