"""Tensor parallel on CPU: a gloo process group started here (``run_ranks``), the Qwen2 plan, and
the TP=1 vs TP=N decode report of ``python -m perf --tp N``."""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .harness.tables import Stamp, markdown_table


def free_port() -> int:
    """A TCP port free on this machine right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int, world_size: int, port: int, threads: int, timeout: float, fn: Callable, args: tuple, results: Any
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
    try:
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300, threads: int = 1) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined in a gloo
    process group (CPU) on a free port, each with ``threads`` torch threads; returns the values
    by rank. ``fn`` must be importable (a module-level function) and return something picklable.
    RuntimeError with the rank's traceback if one fails; TimeoutError (and the processes killed)
    if they take longer than ``timeout`` seconds."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, threads, timeout, fn, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    out: dict[int, Any] = {}
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{world_size} ranks running {fn.__name__} took over {timeout:.0f} s")
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except Exception:  # queue.Empty: check that nobody died without a word
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a rank exited with code {dead[0].exitcode} running {fn.__name__}") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed running {fn.__name__}:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10 if len(out) == world_size else 0)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [out[r] for r in range(world_size)]


def qwen2_tp_plan() -> dict[str, Any]:
    """Megatron-style plan for transformers' Qwen2 (as its ``base_model_tp_plan``): attention
    q/k/v and MLP gate/up cut by output features (colwise), o and down by input features
    (rowwise, one all-reduce each). Embeddings, norms and the tied lm_head stay replicated."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    layer = "model.layers.*."
    plan: dict[str, Any] = {layer + f"self_attn.{p}_proj": ColwiseParallel() for p in "qkv"}
    plan[layer + "self_attn.o_proj"] = RowwiseParallel()
    plan.update({layer + f"mlp.{p}_proj": ColwiseParallel() for p in ("gate", "up")})
    plan[layer + "mlp.down_proj"] = RowwiseParallel()
    return plan


# o_proj is cut by input features: Qwen2 0.5B's 896 = 7 groups of 128 cannot be halved (check_plan
# says so), 14 groups of 64 can; so every int4 row of the TP report uses group 64.
TP_GROUP_SIZE = 64


def param_bytes_per_rank(model: torch.nn.Module) -> int:
    """Bytes of every parameter this rank holds: local shards (quantized: their inner tensors)
    and replicated parameters alike."""
    from subclasses import QuantizedWeight
    from subclasses.runtime.tensor_parallel import local_weight

    total = 0
    for param in model.parameters():
        local = local_weight(param)
        tensors = local.inner_tensors() if isinstance(local, QuantizedWeight) else [local]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _rank_decode(
    rank: int, world_size: int, name: str, fmts: list[str], threads: int, rounds: int, tokens: int
) -> list[dict[str, Any]]:
    """In every rank: build the Qwen2 ``name`` (the same random weights everywhere), bf16 and each
    format, TP=1 (timed on rank 0 alone with all ``threads``, the other ranks waiting) and
    TP=``world_size`` (``threads // world_size`` per rank), eager and compiled (unwrapped), then
    time greedy decoding in interleaved rounds. Rank 0's rows (ms/token: minimum over rounds of
    the mean of ``tokens`` steps)."""
    import copy
    import warnings

    from torch.distributed.device_mesh import init_device_mesh

    from subclasses import quantize_
    from subclasses.runtime.tensor_parallel import parallelize
    from unwrap import unwrap

    from .harness.decode import Decoder, room_for
    from .harness.models import build_llm, config
    from .harness.timing import interleaved_min

    warnings.simplefilter("ignore")
    per_rank = max(1, threads // world_size)
    torch.set_num_threads(per_rank)
    mesh = init_device_mesh("cpu", (world_size,))
    bf16 = build_llm(name)[0]
    models = {"bf16": bf16}
    for fmt in fmts:
        models[fmt] = quantize_(copy.deepcopy(bf16), config(fmt, TP_GROUP_SIZE))
    decoders: dict[tuple[str, int, str], Decoder] = {}
    rows: list[dict[str, Any]] = []
    for variant, model in models.items():
        tp1 = unwrap(copy.deepcopy(model))
        tpn = unwrap(parallelize(copy.deepcopy(model), mesh, qwen2_tp_plan()))
        if rank == 0:
            torch.set_num_threads(threads)
            for mode in ("eager", "compiled"):
                decoders[(variant, 1, mode)] = Decoder.for_mode(tp1, mode)
            decoders[(variant, 1, "compiled")].next()  # compiles now
            torch.set_num_threads(per_rank)
        dist.barrier()
        for mode in ("eager", "compiled"):
            decoders[(variant, world_size, mode)] = Decoder.for_mode(tpn, mode)
        decoders[(variant, world_size, "compiled")].next()
        rows.append(dict(variant=variant, bytes={1: param_bytes_per_rank(tp1), world_size: param_bytes_per_rank(tpn)}))

    # the same keys, so the same barriers, on every rank; TP=1 decoders exist on rank 0 only (the
    # other ranks wait at the next key's barrier while it runs alone)
    keys = [(variant, tp, mode) for variant in models for tp in (1, world_size) for mode in ("eager", "compiled")]

    def before(key: tuple[str, int, str]) -> None:
        dist.barrier()
        torch.set_num_threads(threads if key[1] == 1 else per_rank)
        if key in decoders:
            room_for(decoders[key], tokens)

    def nothing() -> None:
        pass

    steps = {key: decoders[key].next if key in decoders else nothing for key in keys}
    with torch.inference_mode():
        seconds = interleaved_min(steps, rounds=rounds, number=tokens, warmup=tokens, before=before)
    torch.set_num_threads(per_rank)
    for row in rows:
        row["ms"] = {
            f"{tp} {mode}": seconds[(row["variant"], tp, mode)] * 1e3
            if (row["variant"], tp, mode) in decoders
            else None
            for tp in (1, world_size)
            for mode in ("eager", "compiled")
        }
    return rows


def tp_report(
    world_size: int,
    names: list[str],
    fmts: list[str],
    *,
    threads: int,
    quick: bool,
    progress: Callable[[str], None] = print,
    stamp: Stamp | None = None,
) -> str:
    """``python -m perf --tp N``: greedy decode ms/token of the built-in Qwen2 models, TP=1 vs
    TP=``world_size`` (gloo on CPU, one process per rank), bf16 and each format, eager and
    compiled; a Markdown table per model (each stamped with ``stamp`` when given)."""
    rounds, tokens = (3, 4) if quick else (10, 8)
    out = [
        f"unwrap tensor-parallel report: torch {torch.__version__}, gloo on CPU, batch 1, greedy decode; "
        f"TP=1 runs alone with {threads} thread(s), TP={world_size} with {max(1, threads // world_size)} per rank; "
        f"ms/token, minimum over {rounds} interleaved rounds of {tokens} tokens; int4 group size {TP_GROUP_SIZE}"
    ]
    for name in names:
        progress(f"{name}: TP=1 vs TP={world_size}, building and compiling in {world_size} processes")
        rows = run_ranks(_rank_decode, world_size, name, fmts, threads, rounds, tokens, timeout=3600)[0]
        head = [
            "variant",
            "TP=1 eager",
            "TP=1 compiled",
            f"TP={world_size} eager",
            f"TP={world_size} compiled",
            f"compiled TP={world_size} / TP=1",
            f"params MiB per rank (TP=1 / TP={world_size})",
        ]
        table = []
        for row in rows:
            ms = row["ms"]
            c1, cn = ms["1 compiled"], ms[f"{world_size} compiled"]
            cells = [f"{ms[k]:.2f}" for k in ("1 eager", "1 compiled", f"{world_size} eager", f"{world_size} compiled")]
            mib = " / ".join(f"{row['bytes'][tp] / 2**20:.1f}" for tp in (1, world_size))
            table.append([row["variant"], *cells, f"{cn / c1:.2f}", mib])
        title = f"{name}, TP=1 vs TP={world_size} (ms/token)"
        out.append(markdown_table(head, table, title=title, stamp=stamp.line() if stamp else None))
    return "\n\n".join(out) + "\n"
