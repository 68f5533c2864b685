"""The same weights in both engines at any shape: a transformers model converted to GGUF by llama.cpp's own
``convert_hf_to_gguf.py`` (f16), which ``perf.llama_cpp.gguf_files`` then quantizes (Q4_0, Q8_0) as
llama.cpp's quantize tool would; ours quantizes the same bf16 weights with the library's default config.

The converter ships in llama-cpp-python's source distribution (``vendor/llama.cpp``), not in its wheel:
``llama_cpp_source()`` downloads that sdist once (pip, ~75 MB) into ``~/.cache/unwrap`` unless
``LLAMA_CPP_SOURCE`` names a llama.cpp checkout. The converter imports ``sentencepiece``.

The tokenizer is SmolLM2's (from its GGUF; the converter does not know its pre-tokenizer hash, so the
conversion names it, "smollm"); a model with a larger vocabulary gets llama.cpp's padding tokens past it.
Prompts are token ids of that tokenizer, the same ids in both engines.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from torch import nn

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"  # the peer's version (pyproject's 'llama' extra)
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unwrap"

# Run in a fresh interpreter: the converter brings its own gguf-py, which must not meet the installed gguf.
_CONVERT = """
import runpy, sys
source, model_dir, out = sys.argv[1:4]
sys.path[:0] = [source + "/gguf-py", source]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outtype", "f16", "--outfile", out]
runpy.run_path(source + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def llama_cpp_source() -> Path:
    """A llama.cpp source tree holding ``convert_hf_to_gguf.py``: ``$LLAMA_CPP_SOURCE``, or the one in
    llama-cpp-python's sdist, downloaded and unpacked into ``~/.cache/unwrap`` on first use."""
    if "LLAMA_CPP_SOURCE" in os.environ:
        source = Path(os.environ["LLAMA_CPP_SOURCE"])
        if not (source / "convert_hf_to_gguf.py").is_file():
            raise FileNotFoundError(f"LLAMA_CPP_SOURCE={source} holds no convert_hf_to_gguf.py")
        return source
    version = LLAMA_CPP_SDIST.split("==")[1]
    source = CACHE / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (source / "convert_hf_to_gguf.py").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as download:
            pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"]
            subprocess.run([*pip, LLAMA_CPP_SDIST, "-d", download], check=True)
            with tarfile.open(next(Path(download).glob("*.tar.gz"))) as sdist:
                sdist.extractall(CACHE, filter="data")
    return source


def convert(model: nn.Module, tokenizer: object, folder: str) -> str:
    """``model`` (a transformers causal LM) and ``tokenizer`` saved into ``folder`` and converted by
    llama.cpp's converter to an f16 GGUF there; returns its path."""
    model.save_pretrained(folder)  # type: ignore[operator]
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
    out = os.path.join(folder, "model.f16.gguf")
    run = subprocess.run(
        [sys.executable, "-c", _CONVERT, str(llama_cpp_source()), folder, out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if run.returncode != 0:
        raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed on {folder}:\n{run.stderr[-2000:]}")
    return out


@contextlib.contextmanager
def same_weights_gguf(model: nn.Module) -> Iterator[str]:
    """The f16 GGUF of ``model``'s weights with SmolLM2's tokenizer, in a temporary folder removed after."""
    from transformers import AutoTokenizer

    from .real_model import SMOLLM2_GGUF, shared_gguf_parsing, smollm2_dir

    with warnings.catch_warnings(), shared_gguf_parsing():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    with tempfile.TemporaryDirectory(prefix="unwrap-same-weights-") as folder:
        yield convert(model, tokenizer, folder)
