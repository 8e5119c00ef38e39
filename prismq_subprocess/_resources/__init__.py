"""_resources: see docs/ARCHITECTURE.md."""
