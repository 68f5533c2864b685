"""How int4 scales, zeros and codes are chosen (the stored format and the kernel do not change).

``"tinygemm"``: torchao's min-max math (``int4_tensor.quantize_int4``), bit-identical to torchao.

``"mse"`` (the default): per row and group, search the (scale, zero) that minimise the weight's
importance-weighted squared error ``sum(h * (w - ((q - 8) * scale + zero))**2)``, ``h = |w| + mean|w|``
over the group (large weights count more, as in llama.cpp's k-quants), calibration-free:

1. candidate grids: step ``range / (15 + d)`` anchored at the group's minimum, for each ``d`` in
   ``MSE_CANDIDATES`` (d < 0: a coarser grid than min-max; d > 0: finer, clipping the largest weights);
   codes ``q`` = nearest grid point;
2. for each candidate's codes, the weighted least-squares (scale, zero) (closed form: a line fit of
   ``w`` on ``q``), scored by the weighted error it leaves; keep the best per group;
3. ``MSE_REFINEMENTS`` rounds of: codes nearest to the best grid, least-squares refit (Lloyd);
4. scale and zero rounded to the weight's dtype (the zero refit to the rounded scale), codes nearest to
   the stored grid;
5. per group, keep whichever of this and min-max has the smaller plain squared error *as the kernel dequantizes it*
   (stored scale and zero, fp32 arithmetic): so "mse" never does worse than "tinygemm" on any group.

Work is in fp32 on chunks of 2^18 elements, each one fused loop (``torch.compile``) for large weights.
Deterministic: only elementwise ops, min/max and sums as a fixed tree of adds (``_tree_sum``), so
the compiled loop returns exactly the eager result (tested), whatever the chunking or thread count.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch._subclasses.fake_tensor import is_fake

QPARAMS_ALGORITHMS = ("tinygemm", "mse")
# "mse": the most accurate; deterministic (its eager and compiled paths give the same bits), so
# quantizing a weight twice gives the same codes whatever ran before in the process.
DEFAULT_QPARAMS_ALGORITHM = "mse"
# Chosen on 28 of SmolLM2-135M's real weight matrices: squared weight error relative to min-max at g64,
# 4 candidates + 2 refinements 0.70, 11 + 2: 0.695, 6 + 4: 0.70, 1 + 2: 0.80 (g128: 0.78, 0.775, 0.77, 0.87).
MSE_CANDIDATES = (-0.5, 0.0, 0.5, 1.0)
MSE_REFINEMENTS = 2
_CHUNK_ELEMENTS = 1 << 18  # elements per chunk: the fp32 copy (1 MiB) stays in cache


def check_qparams_algorithm(algorithm: str) -> None:
    """ValueError unless ``algorithm`` is one of ``QPARAMS_ALGORITHMS``."""
    if algorithm not in QPARAMS_ALGORITHMS:
        raise ValueError(f"qparams_algorithm must be one of {QPARAMS_ALGORITHMS}, got {algorithm!r}")


def group_squared_error(
    w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Per-group squared error [N, K/g] (float64) of codes q [N, K] with scale, zero [N, K/g], the
    weight dequantized as the kernel does: ``(q - 8) * scale + zero`` in fp32 from the stored values."""
    n, k = w.shape
    groups, codes = w.reshape(-1, group_size), q.reshape(-1, group_size)
    return _error(groups, codes, scale.reshape(-1), zero.reshape(-1)).view(n, -1)


def _tree_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension (a power of two) [R, g] -> [R, 1] as one fixed binary tree of
    elementwise adds. A reduction's order is the kernel's choice (eager and inductor differ in the
    last bits); elementwise adds are not, so eager and compiled results are bit-identical."""
    while t.shape[-1] > 1:
        half = t.shape[-1] // 2
        t = t[..., :half] + t[..., half:]
    return t


def _error(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per-group squared error of groups x [R, g] for codes q [R, g], scale and zero [R], float64."""
    # same ops and order as Int4WeightTensor.dequantize on an fp32 weight
    deq = (q.to(torch.float32) - 8) * scale.to(torch.float32).unsqueeze(-1) + zero.to(torch.float32).unsqueeze(-1)
    return _tree_sum((deq.double() - x.double()).square()).squeeze(-1)


def _fit(
    xc: torch.Tensor, h: torch.Tensor, sum_h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, best: list[torch.Tensor]
) -> None:
    """Codes ``q = clamp(round(xc * a + b), 0, 15)`` for groups xc [R, g] centred on their
    h-weighted mean; the weighted least-squares fit ``xc ~ s * (q - qbar)`` (``qbar`` the weighted
    mean code) reduces the h-weighted squared error by ``gain = cov(xc, q)**2 / var(q)``.
    Updates ``best = [gain, s, qbar]`` (each [R, 1]) in place where the gain is larger."""
    q = torch.clamp(torch.round(xc * a + b), 0, 15)
    hq = h * q
    sum_hq = _tree_sum(hq)
    var_q = _tree_sum(hq * q) - sum_hq * sum_hq / sum_h  # 0 when all codes agree
    cov = _tree_sum(hq * xc)  # xc has weighted mean 0, so this is the covariance
    ok = var_q > 0
    var_q = torch.where(ok, var_q, 1.0)
    gain = torch.where(ok, cov * cov / var_q, 0.0)
    better = gain > best[0]
    best[0] = torch.where(better, gain, best[0])
    best[1] = torch.where(better, cov / var_q, best[1])
    best[2] = torch.where(better, sum_hq / sum_h, best[2])


def _mse_chunk(
    w: torch.Tensor, old_q: torch.Tensor, old_scale: torch.Tensor, old_zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups w [R, g] (weight dtype) and min-max's codes [R, g], scale and zero [R] -> the "mse"
    codes, scale, zero (same shapes and dtypes): per group, whichever has the smaller error.

    Only elementwise ops, min/max and ``_tree_sum``: the compiled function (with
    ``emulate_precision_casts``) returns exactly what the eager one does."""
    x = w.to(torch.float32)
    g = x.shape[-1]
    # importance of each weight: its magnitude plus the group's mean magnitude (as llama.cpp's
    # k-quants weight the error, with the mean instead of their RMS: sqrt rounds differently eager
    # and compiled): the error of a large weight costs more.
    h = x.abs() + _tree_sum(x.abs()) / g
    sum_h = torch.clamp(_tree_sum(h), min=1e-30)  # 0 only for an all-zero group
    mean = _tree_sum(h * x) / sum_h
    xc = x - mean
    low, high = xc.amin(-1, keepdim=True), xc.amax(-1, keepdim=True)
    span = torch.clamp(high - low, min=1e-30)  # a constant group: every candidate's codes agree, gain 0
    best = [torch.full_like(low, -1.0), torch.zeros_like(low), torch.zeros_like(low)]
    for d in MSE_CANDIDATES:
        a = (15 + d) / span
        _fit(xc, h, sum_h, a, -low * a, best)
    for _ in range(MSE_REFINEMENTS):  # xc ~ s * (q - qbar): nearest codes q = round(xc / s + qbar)
        s = best[1]
        _fit(xc, h, sum_h, 1 / torch.where(s > 0, s, 1.0), best[2], best)
    # stored: w ~ (q - 8) * scale + zero, zero = mean + scale * (8 - qbar), refit to the rounded scale
    scale = torch.clamp(best[1].to(w.dtype), min=1e-6)
    scale32 = scale.to(torch.float32)
    zero = (mean + scale32 * (8 - best[2])).to(w.dtype)
    q = torch.clamp(torch.round((x - zero.to(torch.float32)) / scale32 + 8), 0, 15).to(torch.uint8)
    scale, zero = scale.squeeze(-1), zero.squeeze(-1)
    # The importance weighting can cost plain squared error; per group keep the new choice only
    # where that error is smaller (by a margin that a float64 sum in another order cannot overcome).
    keep = _error(x, q, scale, zero) < _error(x, old_q, old_scale, old_zero) * (1 - 1e-9)
    return (
        torch.where(keep.unsqueeze(-1), q, old_q),
        torch.where(keep, scale, old_scale),
        torch.where(keep, zero, old_zero),
    )


# The compiled search (one fused loop per chunk) is ~10x faster than eager but costs a compile of
# ~5-40 s per group size and dtype (once per process; inductor's disk cache makes repeats cheaper).
# So a small weight runs eagerly (~0.1 s per 2^18 elements) until the process has searched
# EAGER_BUDGET_NUMEL elements eagerly: a model's worth of weights compiles, a test's does not.
COMPILE_MIN_NUMEL = 1 << 20
EAGER_BUDGET_NUMEL = 1 << 23
_eager_numel = 0
_compiled: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def _chunk_fn(w: torch.Tensor) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    global _compiled, _eager_numel
    if is_fake(w) or w.device.type == "meta":  # no data: the compiled kernel would read garbage
        return _mse_chunk
    if w.numel() < COMPILE_MIN_NUMEL and _eager_numel < EAGER_BUDGET_NUMEL:
        _eager_numel += w.numel()
        return _mse_chunk
    if _compiled is None:  # static shapes (chunks are padded to one size): vectorized by inductor
        # emulate_precision_casts: round to the weight's dtype where the eager code does (inductor
        # would otherwise keep a bf16 scale in fp32 inside the fused loop, and its codes would differ)
        _compiled = torch.compile(_mse_chunk, dynamic=False, options={"emulate_precision_casts": True})
    return _compiled


def mse_qparams(
    w: torch.Tensor, group_size: int, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "mse" choice for w [N, K], given min-max's codes q [N, K] and scale, zero [N, K/g]: the
    same shapes and dtypes back, per group whichever of the two has the smaller squared error.

    Chunks of ``_CHUNK_ELEMENTS`` go through ``_mse_chunk``, compiled once per group size and dtype
    (the last chunk padded to full size) or eagerly for small weights (see ``COMPILE_MIN_NUMEL``).
    If compiling fails (no C++ compiler), warns once and runs eagerly from then on."""
    global _compiled
    n, k = w.shape
    groups, codes = w.reshape(-1, group_size), q.reshape(-1, group_size)
    scale, zero = scale.reshape(-1), zero.reshape(-1)
    rows = max(1, _CHUNK_ELEMENTS // group_size)
    fn = _chunk_fn(w)
    outs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for start in range(0, groups.shape[0], rows):
        args = [t[start : start + rows] for t in (groups, codes, scale, zero)]
        size = args[0].shape[0]
        if fn is not _mse_chunk:  # one static shape: the compiled function never recompiles
            args = [torch.cat([t, t.new_zeros((rows - size, *t.shape[1:]))]) for t in args]
        try:
            out = fn(*args)
        except Exception as error:  # a backend failure: keep working, slower
            if fn is _mse_chunk:
                raise
            warnings.warn(f"compiling the int4 mse search failed ({error!r}); running it eagerly", stacklevel=2)
            _compiled = fn = _mse_chunk
            out = fn(*args)
        outs.append(tuple(t[:size] for t in out))  # type: ignore[arg-type]
    new_q, new_scale, new_zero = (torch.cat(parts) for parts in zip(*outs))
    return new_q.view(n, k), new_scale.view(n, -1), new_zero.view(n, -1)
