"""``python -m prismq_subprocess``: the command line (see docs/CLI.md)."""

import sys

from prismq_subprocess._cli import main

# Guarded: uvicorn's --reload/--workers children (multiprocessing "spawn") import the parent's
# __main__ module again, and must not run the command line a second time.
if __name__ == "__main__":
    sys.exit(main())
