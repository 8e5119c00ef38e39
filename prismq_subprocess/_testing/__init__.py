"""Test doubles and checks for applications built on the library (used by the pytest plugin)."""
