"""`stop_orphan_tree`: the public way to stop what a dead host's run left running.

The work is done by ``_platform._orphans``, below the layer our exceptions live in; this module
checks the caller's arguments first, so that a bad one is our error, raised before any signal
(a grace of NaN or -1 was a bare ``ValueError`` from ``time.sleep()`` once SIGTERM had gone).
"""

from __future__ import annotations

import os

from .._core._exceptions import InvalidArgumentTypeError
from .._core._validation import check_timeout
from .._platform._orphans import OrphanCheck, ProcessIdentity, stop_orphan_trees

__all__ = ["stop_orphan_tree"]


def stop_orphan_tree(
    identity: ProcessIdentity, grace: float = 5.0, proc_root: str | None = None
) -> OrphanCheck:
    """Stop the tree of a dead host's run if ``identity`` still names its child.

    Verifies first: ``identity``'s pid must still be the process that started at
    ``identity.started_at`` (within the rounding of the boot time, see
    :class:`ProcessIdentity`). VERIFIED: SIGTERM (``TerminateProcess`` on Windows) to the
    child, to every process holding its cookie and to their descendants; up to ``grace``
    seconds; then one more look (for what was forked meanwhile) and SIGKILL to what is left.
    GONE (the child has exited): the same for every process still holding its cookie and their
    descendants. REUSED, UNPROVEN: nothing is signalled. Every signal goes through a psutil
    handle, which checks the start time first. ``proc_root`` is where the process table is
    read from (``/proc`` on Linux by default; for tests). Blocking: call it from a worker
    thread. Returns within about ``grace + 1`` seconds.

    Raises (before anything is signalled):
        InvalidArgumentTypeError: ``identity`` is not a :class:`ProcessIdentity` (or its pid
            is not an int, its start time not a number), or ``proc_root`` is not a path.
        InvalidTimeoutError: ``grace`` is negative, NaN, infinite or not a number.
    """
    if not isinstance(identity, ProcessIdentity):
        raise InvalidArgumentTypeError(
            f"stop_orphan_tree() needs a ProcessIdentity, got {type(identity).__name__}"
        )
    if isinstance(identity.pid, bool) or not isinstance(identity.pid, int) or identity.pid < 0:
        raise InvalidArgumentTypeError(
            f"stop_orphan_tree(): the identity's pid must be an int >= 0, got {identity.pid!r}"
        )
    started = identity.started_at
    if isinstance(started, bool) or not isinstance(started, int | float):
        raise InvalidArgumentTypeError(
            "stop_orphan_tree(): the identity's started_at must be a number (a "
            f"psutil create_time()), got {type(started).__name__}"
        )
    if identity.cookie is not None and not isinstance(identity.cookie, str):
        raise InvalidArgumentTypeError(
            "stop_orphan_tree(): the identity's cookie must be a str or None, got "
            f"{type(identity.cookie).__name__}"
        )
    grace = check_timeout(grace, "grace", finite=True) or 0.0
    if proc_root is not None:
        if not isinstance(proc_root, str | os.PathLike):
            raise InvalidArgumentTypeError(
                f"stop_orphan_tree(): proc_root must be a path or None, got "
                f"{type(proc_root).__name__}"
            )
        proc_root = os.fspath(proc_root)
    return stop_orphan_trees([identity], grace, proc_root)[0]
