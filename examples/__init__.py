"""Runnable recipes of bilevel (see examples/README.md); each script runs with ``python examples/<name>.py``."""
