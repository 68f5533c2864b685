"""Optional packages in tests: skip locally when missing, fail in CI (CI=true), where the extras
are installed and a missing one is a broken setup, not a reason to pass."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def import_or_fail_in_ci(name: str, extra: str) -> ModuleType:
    """``import name``; missing: pytest.fail when ``CI=true``, else skip (module level allowed)."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        message = f"{name} is not installed (the {extra!r} extra): {error}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)
