"""_core: see docs/ARCHITECTURE.md."""
