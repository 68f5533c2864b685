"""Checkpoints and other ecosystems: torch.save/safetensors, transformers, GGUF, torchao.

May import every other part of ``subclasses``; nothing in the core imports it. The optional
integrations (transformers, gguf, torchao) are imported only when their module is.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn


def mark_transformers_model(model: nn.Module, config: Any) -> None:
    """``quantize_``'s hook: a quantized transformers model's ``save_pretrained`` writes our format.

    Only when transformers is imported already: a model of its can exist only then, and
    ``import subclasses`` never imports it."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return
    from . import hf

    hf.attach(model, config)
