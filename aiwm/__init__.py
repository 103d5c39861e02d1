"""AIWM core: settings, errors, auth, entity models, the store and the CLI.

This package imports nothing from ``actors``, ``serve`` or ``nodeside``.
"""

__version__ = "0.1.0"
