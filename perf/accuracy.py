"""``python -m perf.accuracy``: how close each weight format and int4 qparams algorithm stays to the
bf16 model, on SmolLM2-135M's real weights (``perf.real_model``), and on matrices that were never on a
4-bit grid.

Prints two markdown tables. The model: perplexity on the shipped text, the mean KL divergence of the
next-token distributions from the bf16 model's (on the text's first ``--kld-tokens`` tokens), quantize
time, how many linears were quantized, and per quantized layer against min-max ("tinygemm") at the same
group size (and against torchao's HQQ when its rows are measured): the share of layers whose weight
reconstruction error is lower and whose output SQNR (on the text's first ``--layer-tokens`` tokens,
captured from the bf16 model) is higher, with the medians. SmolLM2's linears come from a Q4_1 GGUF file:
at group 32 they are on a 4-bit grid already (a search can find that grid back), so those rows say so;
at 64 and 128 they are not. The matrices: output SQNR per int4 algorithm and group size of SmolLM2's
``token_embd`` (the tied lm_head, Q8_0 in the file: near full precision) on its captured inputs, and of
seeded heavy-tailed weights with outlier input channels (Qwen2.5-0.5B's shapes) on seeded activations
with outlier channels.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from subclasses import (
    Int4WeightOnlyConfig,
    Int4WeightTensor,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    quantize_,
)
from subclasses.formats.base import QuantizedWeight
from subclasses.kernels.int4_qparams import QPARAMS_ALGORITHMS
from subclasses.quantize.api import WeightConfig

from .harness.tables import markdown_table


@dataclass(frozen=True)
class TorchaoHQQConfig:
    """torchao's HQQ qparams (``_choose_qparams_and_quantize_affine_hqq``, what its
    ``int4_choose_qparams_algorithm="hqq"`` runs) stored in our int4 format: a comparison, needs torchao."""

    group_size: int

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        return Int4WeightOnlyConfig(self.group_size).unsupported_reason(weight)

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

        n, k = weight.shape
        g = Int4WeightOnlyConfig(self.group_size).group_size_for(k)  # our fallback to 32: the same layers
        q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
            weight.detach(), nbits=4, group_size=g, axis=1, compute_dtype=weight.dtype, device="cpu"
        )
        scale_and_zero = torch.stack([scale.view(n, -1), zero.view(n, -1)], -1).transpose(0, 1).contiguous()
        return Int4WeightTensor.from_codes(q.view(n, k), scale_and_zero, g, weight.dtype)


@dataclass
class Row:
    label: str
    config: WeightConfig | None  # None: the bf16 model itself
    group_size: int | None = None
    algorithm: str | None = None
    calibrated: bool = False  # quantize_(..., calibration=...): GPTQ
    quantized: int = 0
    linears: int = 0
    quantize_s: float = 0.0
    perplexity: float = float("nan")
    kld: float = float("nan")  # mean KL(bf16 || this) of the next-token distributions
    # per quantized layer name: (relative squared weight error, output SQNR dB, int4 group size or 0)
    layers: dict[str, tuple[float, float, int]] = field(default_factory=dict)


ALGORITHMS = (*QPARAMS_ALGORITHMS, "hqq", "gptq")


def variants(group_sizes: list[int], algorithms: list[str]) -> list[Row]:
    """The table's rows: bf16, int8 weight-only (and with GPTQ), w8a8, then int4 per group size and
    algorithm ("hqq": torchao's; "gptq": "mse" with ``quantize_(..., calibration=...)``)."""
    rows = [Row("bf16", None), Row("int8 weight-only", Int8WeightOnlyConfig())]
    if "gptq" in algorithms:
        rows.append(Row("int8 weight-only + GPTQ", Int8WeightOnlyConfig(), calibrated=True))
    rows.append(Row("int8 w8a8 (dynamic act)", Int8DynamicActivationInt8WeightConfig()))
    for g in group_sizes:
        for algorithm in algorithms:
            if algorithm == "hqq":
                config: WeightConfig = TorchaoHQQConfig(g)
            else:
                config = Int4WeightOnlyConfig(g, qparams_algorithm="mse" if algorithm == "gptq" else algorithm)
            label = f"int4 g{g} mse + GPTQ" if algorithm == "gptq" else f"int4 g{g} {algorithm}"
            rows.append(Row(label, config, g, algorithm, calibrated=algorithm == "gptq"))
    return rows


def capture_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each ``nn.Linear``'s input (flattened to [tokens, in_features]) when ``model`` runs ``ids``."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(
            lambda m, args, out, name=name: inputs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with torch.inference_mode():
            model(ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [T, vocab] (fp32) of ``model`` on ids [1, T], one forward."""
    with torch.inference_mode():
        return F.log_softmax(model(ids, use_cache=False).logits[0].float(), dim=-1)


def kl_divergence(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean over positions of KL(reference || candidate), both log-probabilities [T, vocab]."""
    return F.kl_div(candidate, reference, log_target=True, reduction="batchmean").item()


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (20 * torch.log10(ref.norm() / (ref - out).norm())).item()


def layer_errors(
    reference: nn.Module, quantized: nn.Module, inputs: dict[str, torch.Tensor]
) -> dict[str, tuple[float, float, int]]:
    """Per quantized linear: (||W_q - W||^2 / ||W||^2, output SQNR of x @ W_q^T against x @ W^T, group
    size), in fp32; the group size is the int4 weight's (0 for other formats)."""
    weights = {name: m.weight for name, m in reference.named_modules() if isinstance(m, nn.Linear)}
    out: dict[str, tuple[float, float, int]] = {}
    for name, module in quantized.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or not isinstance(weight, QuantizedWeight):
            continue
        w = weights[name].detach().float()
        deq = weight.to(torch.float32).dequantize()
        x = inputs[name].float()
        out[name] = (
            ((deq - w).square().sum() / w.square().sum()).item(),
            sqnr_db(F.linear(x, w), F.linear(x, deq)),
            getattr(weight, "group_size", 0),
        )
    return out


def measure(
    model: nn.Module,
    ids: torch.Tensor,
    rows: list[Row],
    perplexity: Callable[[nn.Module, torch.Tensor], float],
    *,
    layer_tokens: int = 256,
    kld_tokens: int = 512,
    calibration: list[torch.Tensor] | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
    reference: torch.Tensor | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> list[Row]:
    """Fill in ``rows`` (see ``variants``): each quantized on a copy of the bf16 ``model``; the
    calibrated rows with ``calibration`` (batches of token ids, not the evaluated text). ``inputs`` (each
    linear's input on the first ``layer_tokens`` tokens) and ``reference`` (the bf16 log-probabilities of the
    first ``kld_tokens``) are computed here unless the caller has them."""
    inputs = capture_inputs(model, ids[:, :layer_tokens]) if inputs is None else inputs
    reference = log_probs(model, ids[:, :kld_tokens]) if reference is None else reference
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    for row in rows:
        candidate = model
        if row.config is not None:
            candidate = copy.deepcopy(model)
            start = time.perf_counter()
            with warnings.catch_warnings():  # the weights left in bf16 are counted below
                warnings.simplefilter("ignore")
                quantize_(candidate, row.config, calibration=calibration if row.calibrated else None)
            row.quantize_s = time.perf_counter() - start
            row.layers = layer_errors(model, candidate, inputs)
        row.linears = linears
        row.quantized = len(row.layers)
        row.perplexity = perplexity(candidate, ids)
        row.kld = kl_divergence(reference, log_probs(candidate, ids[:, :kld_tokens]))
        progress(
            f"{row.label}: perplexity {row.perplexity:.3f}, KLD {row.kld:.4f}, {row.quantized}/{linears} linears, "
            f"quantize {row.quantize_s:.1f} s"
        )
    return rows


def llama_rows(ids: torch.Tensor, reference: torch.Tensor, *, threads: int, window: int = 512) -> list[Row]:
    """llama.cpp's own 4-bit files of the same weights (``perf.llama_cpp``): Q4_0 made from the shipped Q4_1
    by llama.cpp's quantizer, and the shipped Q4_1 itself, whose weights the bf16 model holds (its KLD is
    llama.cpp's arithmetic alone: 8-bit activations). Perplexity over the same windows as ours, KLD on the
    same first tokens (``reference``: the bf16 model's log-probabilities [tokens, vocab])."""
    from .llama_cpp import gguf_files
    from .llama_cpp import log_probs as llama_log_probs
    from .real_model import perplexity_windows, smollm2_gguf_path

    source = smollm2_gguf_path()
    assert source is not None  # the bf16 model came from it
    tokens = ids[0].tolist()
    windows = [chunk[0].tolist() for chunk in perplexity_windows(ids, window)]
    rows = []
    with gguf_files(source, ["Q4_0", "Q4_1"]) as paths:
        for ggml_type, path in paths.items():
            *per_window, first = llama_log_probs(path, [*windows, tokens[: reference.shape[0]]], threads=threads)
            nll = sum(
                F.nll_loss(lp[:-1], torch.tensor(w[1:]), reduction="sum").item() for lp, w in zip(per_window, windows)
            )
            row = Row(f"llama.cpp {ggml_type}" + (" (the shipped file)" if ggml_type == "Q4_1" else ""), None)
            row.perplexity = math.exp(nll / sum(len(w) - 1 for w in windows))
            row.kld = kl_divergence(reference, first)
            rows.append(row)
    return rows


def versus(row: Row, rows: list[Row], algorithm: str = "tinygemm") -> list[str]:
    """Per-layer comparison against ``algorithm`` (min-max by default) at the same group size, as two
    table cells; only the layers quantized at the row's group size (a layer it does not divide falls
    back to 32: not counted)."""
    base = next((r for r in rows if r.group_size == row.group_size and r.algorithm == algorithm), None)
    if row.group_size is None or base is None or base is row or not row.layers:
        return ["-", "-"]
    names = [n for n in row.layers if n in base.layers and row.layers[n][2] == base.layers[n][2] == row.group_size]
    if not names:
        return ["-", "-"]
    weight = [row.layers[n][0] / base.layers[n][0] for n in names]
    output = [row.layers[n][1] - base.layers[n][1] for n in names]
    better_w = sum(r < 1 for r in weight) / len(names)
    better_o = sum(d > 0 for d in output) / len(names)
    return [
        f"{100 * better_w:.0f} % of {len(names)} (median x{statistics.median(weight):.2f})",
        f"{100 * better_o:.0f} % (median {statistics.median(output):+.2f} dB)",
    ]


def format_table(rows: list[Row], on_grid: int | None = None) -> str:
    """The markdown table; with HQQ rows, two more columns compare each layer with HQQ's. ``on_grid``:
    the group size at which the model's weights are on a 4-bit grid already (labelled so)."""
    bf16 = rows[0].perplexity  # the bf16 model's row comes first
    hqq = any(r.algorithm == "hqq" for r in rows)
    head = [
        "variant",
        "perplexity",
        "vs bf16",
        "KLD vs bf16",
        "linears quantized",
        "quantize s",
        "layers with lower weight error than min-max",
        "layers with higher output SQNR than min-max",
    ]
    if hqq:
        head += ["lower weight error than HQQ", "higher output SQNR than HQQ"]
    cells = [
        [
            row.label + (" (weights already on a 4-bit grid)" if on_grid and row.group_size == on_grid else ""),
            f"{row.perplexity:.2f}",
            f"{row.perplexity - bf16:+.2f}",
            f"{row.kld:.4f}",
            "-" if row.config is None else f"{row.quantized}/{row.linears}",  # bf16, llama.cpp
            "-" if row.config is None else f"{row.quantize_s:.1f}",
            *versus(row, rows),
            *(versus(row, rows, "hqq") if hqq else []),
        ]
        for row in rows
    ]
    return markdown_table(head, cells)


# Qwen2.5-0.5B's linear shapes (out, in): q/o, k/v, gate/up, down
MATRIX_SHAPES = ((896, 896), (128, 896), (4864, 896), (896, 4864))


def heavy_tailed_matrix(n: int, k: int, seed: int, tokens: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded weights [n, k] (bf16) that were never quantized, as real LLM weights: Student-t (3 degrees
    of freedom) with 4 input channels 8x larger; and activations [tokens, k] with 6 channels 15x larger."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=generator) / (torch.randn(3, n, k, generator=generator).square().mean(0)).sqrt()
    w[:, torch.randperm(k, generator=generator)[:4]] *= 8
    x = torch.randn(tokens, k, generator=generator)
    x[:, torch.randperm(k, generator=generator)[:6]] *= 15
    return (w * 0.02).to(torch.bfloat16), x


def int4_quantizer(algorithm: str, group_size: int) -> WeightConfig:
    """The int4 config of ``algorithm`` (a qparams algorithm, or "hqq": torchao's) at ``group_size``."""
    if algorithm == "hqq":
        return TorchaoHQQConfig(group_size)
    return Int4WeightOnlyConfig(group_size, qparams_algorithm=algorithm)


def matrix_table(
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]], group_sizes: list[int], algorithms: list[str]
) -> str:
    """Output SQNR (dB) of ``x @ W_q^T`` against ``x @ W^T`` per matrix (name: (W, x)), group size and
    int4 algorithm, and per row the best algorithm."""
    cells = []
    for g in group_sizes:
        for name, (w, x) in matrices.items():
            ref = F.linear(x.float(), w.float())
            sqnr = {}
            for algorithm in algorithms:
                deq = int4_quantizer(algorithm, g).quantize(w).to(torch.float32).dequantize()
                sqnr[algorithm] = sqnr_db(ref, F.linear(x.float(), deq))
            cells.append([name, g, *(f"{sqnr[a]:.2f}" for a in algorithms), max(sqnr, key=sqnr.__getitem__)])
    return markdown_table(["matrix", "group", *(f"{a} SQNR dB" for a in algorithms), "best"], cells)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument(
        "--algorithms",
        nargs="+",
        default=list(ALGORITHMS),
        choices=ALGORITHMS,
        help="hqq: torchao's, for comparison (needs torchao); gptq: mse + GPTQ on perf/data/calibration_text.txt",
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate only the text's first N tokens")
    parser.add_argument("--layer-tokens", type=int, default=256, help="tokens whose activations score each layer")
    parser.add_argument(
        "--kld-tokens", type=int, default=512, help="tokens whose next-token distributions give the KLD"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write every row's per-layer numbers to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from .real_model import calibration_batches, eval_token_ids, load_smollm2, perplexity

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(torch.bfloat16)
    ids = eval_token_ids(tokenizer)[:, : args.max_tokens]
    inputs = capture_inputs(model, ids[:, : args.layer_tokens])
    reference = log_probs(model, ids[:, : args.kld_tokens])
    print(
        f"SmolLM2-135M, {ids.shape[1]} tokens of perf/data/eval_text.txt, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    rows = measure(
        model,
        ids,
        variants(args.group_sizes, args.algorithms),
        perplexity,
        layer_tokens=args.layer_tokens,
        kld_tokens=args.kld_tokens,
        calibration=calibration_batches(tokenizer),
        inputs=inputs,
        reference=reference,
        progress=lambda line: print(line, flush=True),
    )
    from .llama_cpp import available, build_line

    if available():
        print(build_line(), flush=True)
        rows += llama_rows(ids, reference, threads=args.threads)
    else:
        print("llama-cpp-python is not installed (`make llama`): no llama.cpp rows", flush=True)
    print(format_table(rows, on_grid=32))  # the GGUF file's Q4_1 blocks
    int4 = [a for a in args.algorithms if a != "gptq"]
    lm_head = model.get_submodule("lm_head")  # tied to token_embd
    assert isinstance(lm_head, nn.Linear)
    matrices = {"SmolLM2 token_embd (lm_head)": (lm_head.weight.detach(), inputs["lm_head"])}
    for i, (n, k) in enumerate(MATRIX_SHAPES):
        matrices[f"heavy-tailed {n}x{k}"] = heavy_tailed_matrix(n, k, seed=i)
    print(matrix_table(matrices, args.group_sizes, int4))
    if args.json:
        import dataclasses
        import json

        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in dataclasses.asdict(r).items() if k != "config"} for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
