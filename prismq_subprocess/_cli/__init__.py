"""The ``prismq-subprocess`` command line (``python -m prismq_subprocess``).

Private: the commands and their exit codes are the interface (docs/CLI.md), not these modules.
"""

from __future__ import annotations

from ._main import build_parser, main

__all__ = ["build_parser", "main"]
