"""Process-wide answers (a kernel built, a packing probed) for code that torch.compile traces."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

T = TypeVar("T")


def traced_constant(answer: Callable[[], T]) -> Callable[[], T]:
    """Decorates ``answer`` (no arguments, its work cached by what it calls) as a constant to Dynamo:
    called once per trace, not traced, the graph holding its result. Dynamo calls it under its fake
    tensor mode, so a first call that checks real tensors runs outside that mode here."""

    @torch.compiler.assume_constant_result
    @functools.wraps(answer)
    def traced() -> T:
        with unset_fake_temporarily():
            return answer()

    return traced
