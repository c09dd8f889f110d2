"""Shared fixtures. Heavy objects (tokenizer, models) are session-scoped and built offline."""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from workload.models import load_tokenizer

    return load_tokenizer()
