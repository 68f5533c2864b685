import hashlib
import os
import tempfile
from pathlib import Path


def _code_digest() -> str:
    """A digest of this repository's Python and C++ sources."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in ("subclasses", "unwrap", "perf", "tests"):
        for path in sorted(p for p in (root / package).rglob("*") if p.suffix in (".py", ".cpp", ".h")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# One Inductor/AOTAutograd cache per version of this code: their keys hash the Dynamo graph, and a wrapped
# subclass's F.linear is one opaque call there, so a cache written by another version (an older checkout)
# would be reused as is and may call ops that no longer exist; the same code runs again warm. Set before
# torch is imported: importing torch._dynamo fixes the directory (to torch's default) for the process.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"unwrap-inductor-{_code_digest()}")
)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from perf.harness.models import QWEN2_SHAPES  # noqa: E402

# Property tests are derandomized by default (CI): the same examples every run, no example
# database. HYPOTHESIS_PROFILE=explore searches fresh examples each run.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Qwen2 tiny's widths (4 heads over 2 KV heads, a 4096 vocabulary) in one decoder layer, for the tests of
# transformers models: what they check is per layer, and a compile's time grows with the layers.
QWEN2_ONE_LAYER = dict(QWEN2_SHAPES["Qwen2 tiny"], num_hidden_layers=1)


def tiny_llama_config() -> object:
    """A tiny Llama (4 heads over 2 KV heads, 1 layer: compiling is most of these tests' time)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


# The files that take longest (a cold Inductor cache, 2 cores), longest first. `make test` hands whole files to
# two workers in collection order (--dist loadfile --no-loadscope-reorder); starting the longest first lets
# both workers finish together instead of one running the last long file alone. The rest keep their order.
LONGEST_FILES = (
    "tests/test_compile_matrix.py",
    "tests/test_smollm2.py",
    "tests/test_decode.py",
    "tests/test_tensor_parallel.py",
    "tests/test_architectures.py",
    "tests/perf/test_bench_overhead.py",
    "tests/test_qwen2.py",
    "tests/test_generate.py",
    "tests/subclasses/test_gguf.py",
    "tests/subclasses/test_real_models.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONGEST_FILES)))  # stable: in-file order kept


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    ref, out = ref.float(), out.float()
    return (20 * torch.log10(ref.norm() / (ref - out).norm())).item()


@pytest.fixture(autouse=True)
def _seed_and_reset_dynamo():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield


@pytest.fixture
def aten_int4_kernels(monkeypatch):
    """int4 linears run aten's kernel at every M up to the prefill crossover (our C++ ops switched off:
    the one-row GEMV and the AVX2 integer GEMM), for tests that compare bit for bit with torchao, which
    calls that kernel."""
    import subclasses.kernels.int4_gemv as gemv

    monkeypatch.setenv(gemv.ENV_SWITCH, "0")
    gemv.kernel_available.cache_clear()
    gemv.int8_gemm_available.cache_clear()
    yield
    monkeypatch.delenv(gemv.ENV_SWITCH)
    gemv.kernel_available.cache_clear()
    gemv.int8_gemm_available.cache_clear()
