"""Helpers the tests share: servers, configs, the trainer hold, spool reading.

Imported as `support.X` (pyproject sets pytest's pythonpath to tests/); bench/ and
scripts/ put tests/ on sys.path for the same local server.
"""
