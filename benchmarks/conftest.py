"""Collect bench_*.py here: pytest's default pattern (test_*.py) would skip them.

Only reached when benchmarks/ is named on the command line (pyproject's testpaths is tests/):
    pytest benchmarks/ --benchmark-only
"""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
