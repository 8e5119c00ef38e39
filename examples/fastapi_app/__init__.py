"""A FastAPI app that runs modules in the background and streams their output (see README.md)."""
