"""Tensor parallel on CPU: a gloo process group started here (``run_ranks``), the Qwen2 plan, and
the TP=1 vs TP=N decode report of ``python -m perf --tp N``."""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on this machine right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
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
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, threads, fn, args, results), daemon=True)
             for r in range(world_size)]
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
