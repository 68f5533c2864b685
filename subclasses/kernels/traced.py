"""Process-wide answers (a kernel built, a packing probed) for code that torch.compile traces."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

T = TypeVar("T")


def traced_constant(answer: Callable[[], T]) -> Callable[[], T]:
    """``answer`` (no arguments, cached by the caller) as a constant to Dynamo: it is called once per
    trace, not traced (building a library or running a probe is not traceable), and the graph holds its
    result. Dynamo calls it under its fake tensor mode, so a first call that checks real tensors runs
    outside that mode here."""

    @torch.compiler.assume_constant_result
    @functools.wraps(answer)
    def traced() -> T:
        with unset_fake_temporarily():
            return answer()

    return traced
