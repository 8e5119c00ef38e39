"""_io: see docs/ARCHITECTURE.md."""
