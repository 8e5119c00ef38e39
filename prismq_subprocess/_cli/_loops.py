"""The event-loop factory ``serve`` names in uvicorn's ``--loop`` option.

uvicorn imports it by name in every process it runs the app in, including the processes that
``--reload`` and ``--workers`` start afresh; so each of them builds a loop that can spawn
subprocesses, whatever uvicorn itself would pick there (a selector loop on Windows).
"""

from __future__ import annotations

import asyncio
import logging
import os

import prismq_subprocess as pq

__all__ = ["LOOP_FACTORY", "subprocess_loop"]

logger = logging.getLogger(__name__)

#: The import string uvicorn resolves to :func:`subprocess_loop`.
LOOP_FACTORY = f"{__name__}:subprocess_loop"


def subprocess_loop(platform: str | None = None) -> asyncio.AbstractEventLoop:
    """Return a new event loop that can spawn subprocesses: a Proactor loop on Windows, the
    default loop elsewhere (see :func:`prismq_subprocess.subprocess_loop_factory`).

    uvicorn calls it without arguments; ``platform`` is for tests.
    """
    loop = pq.subprocess_loop_factory(platform)()
    # Visible with a uvicorn --log-config that enables this logger: which loop each process got.
    logger.debug("pid %d runs the app on %s", os.getpid(), type(loop).__name__)
    return loop
