"""Data-aware quantization: ``quantize_(model, config, calibration=batches)`` runs GPTQ.

GPTQ (Frantar et al. 2022) quantizes a linear weight one input column at a time and spreads each
column's rounding error over the columns not yet quantized, weighted by the inverse of the layer's
input second-moment matrix ``H = sum(x^T x)`` over the calibration tokens: it minimises the error of
the layer's *output* on those inputs, not of the weight. The stored format and the kernels do not
change: the result is an ordinary ``Int4WeightTensor`` / ``Int8WeightTensor`` (checkpoints, unwrap,
``torch.compile`` as any other weight).

- int4: groups of the config's size; each group's scale and zero are chosen by the config's
  ``qparams_algorithm`` on the error-updated weights when the group's first column is reached.
- int8 (weight-only and w8a8's weight): the per-row scale of min-max, the codes by GPTQ.

Every layer sees the float model's activations (one forward pass per batch, all layers at once), so
``H`` of every accepted ``nn.Linear`` is held in memory at once (in_features² fp32 each).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from ..formats.base import QuantizedWeight
from ..formats.int4 import Int4WeightTensor, quantize_int4
from ..formats.int8 import Int8WeightTensor

GPTQ_DAMP = 0.01  # fraction of the mean diagonal added to H: keeps the Cholesky factor finite
GPTQ_BLOCK = 128  # columns updated lazily together (the original paper's block)


def _run(model: nn.Module, batch: Any, index: int) -> None:
    """Run ``model`` on one calibration batch: a tensor ``model(batch)``, a tuple/list ``model(*batch)``,
    a dict ``model(**batch)``; a failure names the batch."""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    if isinstance(batch, torch.Tensor):
        args, kwargs, shown = (batch,), {}, f"shape {tuple(batch.shape)}, dtype {batch.dtype}"
    elif isinstance(batch, (tuple, list)):
        args, kwargs, shown = tuple(batch), {}, f"a {type(batch).__name__} of {len(batch)}"
    elif isinstance(batch, dict):
        args, kwargs, shown = (), batch, f"a dict with keys {sorted(batch)}"
    else:
        raise TypeError(
            f"calibration batch {index} must be a tensor, a tuple/list or a dict of model "
            f"inputs, got {type(batch).__name__}"
        )
    try:
        model(*args, **kwargs)
    except Exception as error:
        raise ValueError(f"calibration batch {index} ({shown}) cannot run the model: {error}") from error


def collect_hessians(
    model: nn.Module, calibration: Iterable[Any], accept: Callable[[nn.Module, str], bool]
) -> WeakTensorKeyDictionary:
    """``H = sum over tokens of x^T x`` (fp32, [K, K]) of every ``nn.Linear`` that ``accept`` takes,
    keyed by ``id`` of its weight Parameter (a weight shared by several linears sums their inputs),
    over ``model``'s forward on each calibration batch. Errors name the batch and the rule broken."""
    if isinstance(calibration, torch.Tensor) or not isinstance(calibration, Iterable):
        raise TypeError(
            f"calibration must be a list (or other iterable) of batches, got {type(calibration).__name__}"
            " (one batch of token ids: pass [ids])"
        )
    hessians: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # weight -> H

    def hook(module: nn.Module, args: tuple, fqn: str) -> None:
        x = args[0]
        if x.dtype != module.weight.dtype:
            raise ValueError(
                f"{fqn}'s calibration input has dtype {x.dtype}, its weight {module.weight.dtype}: "
                "calibrate with inputs of the model's dtype"
            )
        x = x.detach().reshape(-1, x.shape[-1]).float()
        hessians[module.weight] = hessians.get(module.weight, 0) + x.T @ x

    handles = [
        module.register_forward_pre_hook(lambda m, args, fqn=fqn: hook(m, args, fqn))
        for fqn, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module.weight, QuantizedWeight) and accept(module, fqn)
    ]
    count = 0
    try:
        with torch.inference_mode():
            for count, batch in enumerate(calibration, 1):
                _run(model, batch, count - 1)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("calibration is empty: give at least one batch of model inputs")
    if handles and not hessians:
        raise ValueError("the calibration batches reached none of the linear layers to quantize")
    return hessians


def _inverse_cholesky(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` (H damped; inputs never seen: their columns get H = 1 and
    weight 0 in the error propagation, as in the reference GPTQ)."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(GPTQ_DAMP * torch.diagonal(h).mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq(
    weight: torch.Tensor,
    h: torch.Tensor,
    group_size: int,
    choose: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    code: Callable[..., tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    """GPTQ of ``weight`` [N, K] with input second moments ``h`` [K, K]. Every ``group_size`` columns
    ``choose(W[:, group])`` (the error-updated fp32 columns) returns the group's quantization
    parameters (each [N]); ``code(column, *params)`` returns (codes, dequantized column). Returns the
    codes [N, K] (int16) and the list of each group's parameters."""
    w = weight.detach().float().clone()
    n, k = w.shape
    hinv = _inverse_cholesky(h.float(), w)
    codes = torch.empty(n, k, dtype=torch.int16)
    params: list[tuple[torch.Tensor, ...]] = []
    block = max(GPTQ_BLOCK, group_size)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % group_size == 0:
                current = choose(w1[:, i : i + group_size])
                params.append(current)
            q, deq = code(w1[:, i], *current)
            codes[:, i1 + i] = q
            err = (w1[:, i] - deq) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, params


def gptq_int4(weight: torch.Tensor, h: torch.Tensor, group_size: int, qparams_algorithm: str) -> Int4WeightTensor:
    """Int4 (group-wise, the config's qparams algorithm per group) by GPTQ; see ``gptq``."""
    dtype = weight.dtype

    def choose(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, scale, zero = quantize_int4(columns.to(dtype), group_size, qparams_algorithm)
        return scale[:, 0], zero[:, 0]

    def code(column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = scale.float(), zero.float()  # the kernel dequantizes in fp32 from the stored values
        q = torch.clamp(torch.round((column - z) / s + 8), 0, 15)
        return q, (q - 8) * s + z

    codes, params = gptq(weight, h, group_size, choose, code)
    scale = torch.stack([s for s, _ in params], 1)
    zero = torch.stack([z for _, z in params], 1)
    scale_and_zero = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
    return Int4WeightTensor.from_codes(codes.to(torch.uint8), scale_and_zero, group_size, dtype)


def gptq_int8(weight: torch.Tensor, h: torch.Tensor, reference: Int8WeightTensor) -> Int8WeightTensor:
    """Int8 per-row (``reference``'s scale and class: weight-only or w8a8) with codes by GPTQ."""
    scale = reference.scale.float()

    def code(column: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.clamp(torch.round(column / s), -128, 127)
        return q, q * s

    codes, _ = gptq(weight, h, weight.shape[1], lambda columns: (scale,), code)
    return type(reference)(codes.to(torch.int8), reference.scale, tuple(weight.shape), weight.dtype)


@dataclass(frozen=True)
class CalibratedConfig:
    """``base`` (an int4 or int8 config) whose ``quantize`` runs GPTQ for the weights in ``hessians``
    (the Parameter -> H) and ``base.quantize`` for the others (embeddings, unseen layers)."""

    base: Any
    hessians: WeakTensorKeyDictionary

    def __getattr__(self, name: str) -> Any:  # strict_reason, scale_covers_row, group_size_for, ...
        if name in ("base", "hessians") or name.startswith("__"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"{self.base!r} + GPTQ calibration ({len(self.hessians)} layers)"

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        return self.base.unsupported_reason(weight)

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        reference = self.base.quantize(weight)
        h = self.hessians.get(weight)
        if h is None:
            return reference
        if isinstance(reference, Int4WeightTensor):
            return gptq_int4(weight, h, reference.group_size, self.base.qparams_algorithm)
        if isinstance(reference, Int8WeightTensor):
            return gptq_int8(weight, h, reference)
        raise TypeError(f"calibration supports int4 and int8 weights, not {type(reference).__name__}")


def calibrated(
    model: nn.Module, config: Any, calibration: Iterable[Any], accept: Callable[[nn.Module, str], bool]
) -> CalibratedConfig:
    """``config`` with GPTQ on the layers that ``calibration`` (batches of model inputs) reaches."""
    return CalibratedConfig(config, collect_hessians(model, calibration, accept))
