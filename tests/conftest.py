"""Shared test set-up: make ``tests/`` importable for the helper modules."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    # `pytest -m cuda` selects the tests that need a GPU; without one they skip with a reason.
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (run `pytest -m cuda` on a GPU machine)")
