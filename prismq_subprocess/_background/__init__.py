"""_background: see docs/ARCHITECTURE.md."""
