"""The decode step as an AOTInductor package, stepped like ``decode.Decoder`` (the ``decode+aoti`` mode).

``compile_for_decode``'s step goes through Dynamo at every token: guard evaluation (~0.2 ms on
SmolLM2), the bytecode that gathers the cache's ~90 tensors, AOTAutograd's runtime wrapper. Here the
same model (grouped-KV decode attention, fused projections) is exported with its ``StaticCache`` as
buffers (transformers' ``TorchExportableModuleWithStaticCache``, strict export: the cache's tensors are
tracked by identity) and compiled by ``aoti_compile_and_package`` with the step's Inductor options and
freezing; a token is one call of the loaded package, with no Python between its kernels and no guards.

A measurement, not a library path: the package holds its own cache and takes one token per call, so
the prompt is fed one token at a time (``reset``), and batches, masks and the prompt path are not
covered. Its logits equal ``compile_decode_step``'s bit for bit on the same tokens (checked by
tests/test_decode.py on a tiny model)."""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any

import torch
from torch import nn

from subclasses.runtime.decode import STEP_OPTIONS, use_gqa_decode_attention
from subclasses.runtime.decode_fusion import fuse_decode_projections


def export_step(model: nn.Module, max_len: int) -> torch.export.ExportedProgram:
    """A copy of ``model`` with the decode attention and fused projections, exported for one token at a
    time over a static cache of ``max_len`` slots held as buffers: ``(input_ids [1, 1], cache_position [1])
    -> logits [1, 1, vocab]``."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    decoding: Any = copy.deepcopy(model)  # a transformers model: its generation_config
    use_gqa_decode_attention(decoding)
    fuse_decode_projections(decoding)
    decoding.generation_config.cache_implementation = "static"
    decoding.generation_config.use_cache = True
    wrapper = TorchExportableModuleWithStaticCache(decoding, batch_size=1, max_cache_len=max_len).eval()
    example = {"input_ids": torch.tensor([[1]]), "cache_position": torch.tensor([0])}
    with torch.no_grad():
        # strict: transformers' wrapper mutates the cache through the cache object, which non-strict
        # export does not map to the buffers it swapped in
        return torch.export.export(wrapper, args=(), kwargs=example, strict=True)


class AotiDecoder:
    """A ``decode.Stepper``: greedy steps through the AOTInductor package of ``export_step(model, max_len)``,
    after a ``prompt_len``-token prompt (token ids 1..prompt_len, as ``Decoder``'s) fed one token per call."""

    def __init__(self, model: nn.Module, *, max_len: int = 256, prompt_len: int = 8) -> None:
        self.max_len, self.prompt_len = max_len, prompt_len
        config: Any = model.config  # a transformers model's
        self.vocab_size = int(config.vocab_size)
        options = {key: value for key, value in STEP_OPTIONS.items() if key != "cpp_wrapper"}
        with tempfile.TemporaryDirectory(prefix="unwrap-aoti-") as folder:
            path = torch._inductor.aoti_compile_and_package(
                export_step(model, max_len),
                package_path=os.path.join(folder, "step.pt2"),
                inductor_configs={**options, "freezing": True},
            )
            self.runner: Any = torch._inductor.aoti_load_package(path)
        self.reset()

    def _step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.runner(input_ids=token, cache_position=torch.tensor([position]))
        return logits[:, -1].float().argmax(-1, keepdim=True)  # as GreedyDecoder: argmax in fp32

    def reset(self) -> int:
        """Feed the prompt from slot 0 (overwriting the cache: slots after it are masked until
        written); returns the first generated token."""
        for position in range(self.prompt_len):
            self.token = self._step(torch.tensor([[(position + 1) % self.vocab_size]]), position)
        self.position = self.prompt_len
        return int(self.token)

    def next(self) -> int:
        """Decode one token; resets when the cache is full."""
        if self.position >= self.max_len:
            self.reset()
        self.token = self._step(self.token, self.position)
        self.position += 1
        return int(self.token)


__all__ = ["AotiDecoder", "export_step"]
