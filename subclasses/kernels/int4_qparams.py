"""How int4 scales, zeros and codes are chosen (the stored format and the kernel do not change).

``"tinygemm"``: torchao's min-max math (``int4_tensor.quantize_int4``), bit-identical to torchao.

``"mse"`` (the default) and ``"clip"``: per row and group, search the (scale, zero) that minimise the
weighted squared error ``sum(h * (w - ((q - 8) * scale + zero))**2)``; ``"clip"`` weighs every weight
alike (``h = 1``: the plain squared error), ``"mse"`` by importance, ``h = |w| + 4 mean|w|`` over the group
(large weights count more, as in llama.cpp's k-quants, but less than their magnitude alone would make them:
``MEAN_WEIGHT``). Calibration-free:

1. candidate grids, codes ``q`` = nearest grid point. Both: step ``range / (15 + d)`` anchored at the
   group's minimum, for each ``d`` in ``MSE_CANDIDATES`` (d < 0: a coarser grid than min-max; d > 0: finer,
   clipping the largest weights). ``"clip"`` also: the range shrunk about its midpoint by each ratio in
   ``CLIP_RATIOS`` (clipping both tails);
2. for each candidate's codes, the weighted least-squares (scale, zero) (closed form: a line fit of
   ``w`` on ``q``), scored by the weighted error it leaves; keep the best per group;
3. a few rounds (``Search.refinements``) of: codes nearest to the best grid, least-squares refit (Lloyd);
4. scale and zero rounded to the weight's dtype (the zero refit to the rounded scale), codes nearest to
   the stored grid;
5. per group, keep whichever of this and min-max has the smaller plain squared error *as the kernel dequantizes it*
   (stored scale and zero, fp32 arithmetic): so neither ever does worse than "tinygemm" on any group.

``"mse"`` was tuned on SmolLM2's weights, which a GGUF file had put on a 4-bit grid at group 32 already.
``"clip"`` leaves less plain weight error off that grid, but the importance weighting of ``"mse"`` keeps
the model's outputs closer where it matters most (SmolLM2's near-full-precision token_embd / lm_head):
docs/accuracy.md.

The search runs on each group's weights rounded to 13-bit integers (``FIXED``), so its sums are exact
in any order; the two plain errors of step 5 are summed as a fixed tree of adds (``_tree_sum``).
A small C++ op (``csrc/int4_qparams.cpp``, built at first use) does the work, 16 groups per vector;
it returns exactly what the eager PyTorch code (``_mse_chunk``, the fallback without a compiler)
returns, whatever the number of threads (tested): deterministic everywhere. Time (``python -m perf.qparams_time``,
the whole ``quantize_`` of Qwen2-0.5B's shapes on 2 cores): "mse" ~2x min-max's, "clip" see docs/accuracy.md.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import is_fake

from .cpp_build import build_library
from .int4_packing import EPS

QPARAMS_ALGORITHMS = ("tinygemm", "mse", "clip")
# "mse": the closest outputs measured (docs/accuracy.md), deterministic, ~1.5-2x min-max's quantize time;
# Int4WeightTensor.from_float keeps "tinygemm".
DEFAULT_QPARAMS_ALGORITHM = "mse"
# Chosen on 28 of SmolLM2-135M's real weight matrices: squared weight error relative to min-max at g64,
# 4 candidates + 2 refinements 0.70, 11 + 2: 0.695, 6 + 4: 0.70, 1 + 2: 0.80 (g128: 0.78, 0.775, 0.77, 0.87).
MSE_CANDIDATES = (-0.5, 0.0, 0.5, 1.0)
MSE_REFINEMENTS = 2
# "mse"'s importance h = |w| + MEAN_WEIGHT * mean|w|. In SmolLM2's down_proj layers one input channel carries
# ~90 % of the activation energy, so a layer's output error is its error on that column, whose weights are
# large: |w| + 1 mean|w| lost 2 of 30 layers' output SQNR to HQQ at g128 and 4 mean|w| 1 (2 and 8: 2);
# at g64, 207 of 210 layers above HQQ (1 mean|w|: ~94 %). docs/accuracy.md.
MEAN_WEIGHT = 4.0
# "clip": the range shrunk about its midpoint (scaled by each ratio), and the grids above, 3 refinements:
# on SmolLM2 at groups 64/128 and seeded heavy-tailed weights, the best mean output SQNR of the sets tried
# (ratios 1..0.7 by 0.05 or 1..0.6 by 0.025, anchored at the midpoint, at zero, or both; 2-4 refinements).
CLIP_RATIOS = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
CLIP_REFINEMENTS = 3


@dataclass(frozen=True)
class Search:
    """One search's parameters. Candidate ``i``'s codes are ``round(u * c / span + offset - low * c / span)``
    on the group's integer weights u (``span = max u - min u``, ``low = min u``), ``c = candidates[i]``,
    ``offset = offsets[i]``; ``mean_weight`` m: weigh the error by ``|w| + m * mean|w|`` (None: plainly)."""

    candidates: tuple[float, ...]
    offsets: tuple[float, ...]
    refinements: int
    mean_weight: float | None


SEARCHES = {
    "mse": Search(tuple(15 + d for d in MSE_CANDIDATES), (0.0,) * len(MSE_CANDIDATES), MSE_REFINEMENTS, MEAN_WEIGHT),
    # the range times r about its midpoint: step span * r / 15, the midpoint on code 7.5
    "clip": Search(
        tuple(15 / r for r in CLIP_RATIOS) + tuple(15 + d for d in MSE_CANDIDATES),
        tuple(7.5 * (1 - 1 / r) for r in CLIP_RATIOS) + (0.0,) * len(MSE_CANDIDATES),
        CLIP_REFINEMENTS,
        None,
    ),
}
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
    elementwise adds. A reduction's order is the kernel's choice (and may depend on the number of
    threads); elementwise adds are not, and the C++ op sums in this same order."""
    while t.shape[-1] > 1:
        half = t.shape[-1] // 2
        t = t[..., :half] + t[..., half:]
    return t


def _error(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per-group squared error of groups x [R, g] for codes q [R, g], scale and zero [R], float64."""
    # same ops and order as Int4WeightTensor.dequantize on an fp32 weight
    deq = (q.to(torch.float32) - 8) * scale.to(torch.float32).unsqueeze(-1) + zero.to(torch.float32).unsqueeze(-1)
    return _tree_sum((deq.double() - x.double()).square()).squeeze(-1)


# The search runs on each group's weights as integers: u = round(w * FIXED / max|w|), |u| <= FIXED.
# Then every sum below is a sum of integers under 2^53 in float64, exact in any order: a native
# reduction, and the C++ op's per-lane sums, give the same bits. The rounding of w to 13 bits only
# steers the search; the final codes use w itself.
FIXED = 4096.0


def _fit(
    u: torch.Tensor,
    h: torch.Tensor,
    sums: tuple[torch.Tensor, ...],
    a: torch.Tensor,
    b: torch.Tensor,
    best: list[torch.Tensor],
) -> None:
    """Codes ``q = clamp(round(u * a + b), 0, 15)`` for integer groups u [R, g] with integer weights h;
    the weighted least-squares line ``u ~ s * q + m`` reduces the weighted squared error by
    ``gain = cov(u, q)**2 / var(q)``. ``sums = (sum h, sum h*u)``. Updates ``best = [gain, s, qbar]``
    (each [R, 1], float64; ``qbar`` the weighted mean code) in place where the gain is larger."""
    sum_h, sum_hu = sums
    q = torch.clamp(torch.round(u * a + b), 0, 15)
    hq = (h * q).double()  # integers: h < 2^21, q < 16
    sum_hq = hq.sum(-1, keepdim=True)
    var_q = (hq * q).sum(-1, keepdim=True) - sum_hq * sum_hq / sum_h  # 0 when all codes agree
    cov = (hq * u).sum(-1, keepdim=True) - sum_hq * sum_hu / sum_h
    ok = var_q > 0
    var_q = torch.where(ok, var_q, 1.0)
    gain = torch.where(ok, cov * cov / var_q, 0.0)
    better = gain > best[0]
    best[0] = torch.where(better, gain, best[0])
    best[1] = torch.where(better, cov / var_q, best[1])
    best[2] = torch.where(better, sum_hq / sum_h, best[2])


def _mse_chunk(
    w: torch.Tensor,
    old_q: torch.Tensor,
    old_scale: torch.Tensor,
    old_zero: torch.Tensor,
    search: Search = SEARCHES["mse"],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups w [R, g] (weight dtype) and min-max's codes [R, g], scale and zero [R] -> ``search``'s
    codes, scale, zero (same shapes and dtypes): per group, whichever has the smaller error.

    The definition of the search: the C++ op (csrc/int4_qparams.cpp) repeats these ops in this order
    and precision. Only elementwise ops, min/max, exact sums (see ``FIXED``) and ``_tree_sum``."""
    x = w.to(torch.float32)
    g = x.shape[-1]
    amax = torch.clamp(x.abs().amax(-1, keepdim=True), min=1e-30)
    u = torch.round(x * (FIXED / amax))  # integers in [-FIXED, FIXED]
    # importance of each weight: its magnitude plus m times the group's mean magnitude (times g, integers
    # below 2^24 for m = MEAN_WEIGHT: exact in fp32; llama.cpp's k-quants weight the error so, with the RMS)
    m = search.mean_weight
    h = g * u.abs() + m * u.abs().sum(-1, keepdim=True) if m is not None else torch.ones_like(u)
    sum_h = torch.clamp(h.double().sum(-1, keepdim=True), min=1.0)  # 0 only for an all-zero group
    sum_hu = (h.double() * u).sum(-1, keepdim=True)
    low, high = u.amin(-1, keepdim=True), u.amax(-1, keepdim=True)
    span = torch.clamp(high - low, min=1.0)  # a constant group: every candidate's codes agree, gain 0
    best = [torch.full_like(sum_h, -1.0), torch.zeros_like(sum_h), torch.zeros_like(sum_h)]
    for c, offset in zip(search.candidates, search.offsets):
        a = c / span
        _fit(u, h, (sum_h, sum_hu), a, -low * a + offset, best)
    for _ in range(search.refinements):  # u ~ s * (q - qbar) + ubar: nearest codes
        s = best[1]
        inv = 1 / torch.where(s > 0, s, 1.0)
        _fit(u, h, (sum_h, sum_hu), inv, best[2] - sum_hu / sum_h * inv, best)
    # stored: w ~ (q - 8) * scale + zero; in w's units scale = s * amax / FIXED, and the zero is refit
    # to the rounded scale: zero = wbar + scale * (8 - qbar), wbar the weighted mean weight
    unit = amax.double() / FIXED
    scale = torch.clamp((best[1] * unit).to(w.dtype), min=EPS)
    scale32 = scale.to(torch.float32)
    zero = (sum_hu / sum_h * unit + scale32.double() * (8 - best[2])).to(w.dtype)
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


# The search runs in a small C++ op (csrc/int4_qparams.cpp: 16 groups at a time, ~20x faster than the
# eager code and free of torch.compile's compile time), built at first use with
# ``torch.utils.cpp_extension.load`` (~20-30 s, cached under TORCH_EXTENSIONS_DIR). It returns
# exactly what ``_mse_chunk`` returns (tested): where it cannot be built (no compiler;
# ``UNWRAP_INT4_QPARAMS_KERNEL=0``), or for fake, meta and non-CPU weights, ``_mse_chunk`` runs instead.
SOURCE = Path(__file__).parent / "csrc" / "int4_qparams.cpp"
ENV_SWITCH = "UNWRAP_INT4_QPARAMS_KERNEL"  # "0": never build or use the C++ op


def _loaded() -> bool:
    return hasattr(torch.ops.unwrap_qparams, "int4_mse")


@functools.cache
def kernel_available() -> bool:
    """Whether ``unwrap_qparams::int4_mse`` is loaded (built on the first call). A failed build
    warns once and answers False from then on."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    if _loaded():  # by another copy of this module
        return True
    # -ffp-contract=off: no fused multiply-adds, the eager code's roundings exactly;
    # -fno-trapping-math lets the compiler vectorize the comparisons (results unchanged);
    # -march=native: built where it runs (the cache is per machine's home directory)
    cflags = ["-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-mprefer-vector-width=512"]
    return build_library(
        "unwrap_int4_qparams", [SOURCE], cflags, "the int4 mse search", "running it in PyTorch (slower)"
    )


def _use_kernel(w: torch.Tensor) -> bool:
    # a fake or meta tensor has no data (only its shape matters); other devices run the eager code
    return w.device.type == "cpu" and not is_fake(w) and kernel_available()


def mse_qparams(
    w: torch.Tensor,
    group_size: int,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    algorithm: str = "mse",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``algorithm`` ("mse" or "clip") choice for w [N, K], given min-max's codes q [N, K] and scale,
    zero [N, K/g]: the same shapes and dtypes back, per group whichever of the two has the smaller squared error.

    The C++ op where it is available, else ``_mse_chunk`` on chunks of ``_CHUNK_ELEMENTS``: the same bits."""
    if algorithm not in SEARCHES:
        raise ValueError(f"algorithm must be one of {tuple(SEARCHES)}, got {algorithm!r}")
    search = SEARCHES[algorithm]
    n, k = w.shape
    groups, codes = w.reshape(-1, group_size), q.reshape(-1, group_size)
    scale, zero = scale.reshape(-1), zero.reshape(-1)
    if _use_kernel(w):
        new_q, new_scale, new_zero = torch.ops.unwrap_qparams.int4_mse.default(
            groups,
            codes,
            scale,
            zero,
            list(search.candidates),
            list(search.offsets),
            search.refinements,
            search.mean_weight,
        )
    else:
        rows = max(1, _CHUNK_ELEMENTS // group_size)
        chunks = [
            _mse_chunk(groups[part], codes[part], scale[part], zero[part], search)
            for part in (slice(start, start + rows) for start in range(0, groups.shape[0], rows))
        ]
        new_q, new_scale, new_zero = (torch.cat(parts) for parts in zip(*chunks))
    return new_q.view(n, k), new_scale.view(n, -1), new_zero.view(n, -1)
