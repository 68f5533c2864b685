"""Memory, time and perplexity of ``subclasses.load_gguf`` on SmolLM2-135M (Q4_1 GGUF), against
transformers' own GGUF loader (which dequantizes every tensor to float32).

``python -m perf.gguf_import [--perplexity]``: each load runs in a fresh process; peak RSS is the
process's ``ru_maxrss`` after the load minus its value after the imports (torch, transformers, gguf).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, time, warnings
import torch, transformers, gguf, subclasses
from perf.real_model import eval_token_ids, load_smollm2, perplexity, smollm2_gguf_path
kind, dtype, with_ppl = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3] == "1"
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before, start = peak_mb(), time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if kind == "load_gguf":
        model, tokenizer = subclasses.load_gguf(smollm2_gguf_path(), dtype)
    else:
        model, tokenizer = load_smollm2(dtype)
seconds, after = time.perf_counter() - start, peak_mb()
params = sum(p.numel() for p in model.parameters())  # a tied weight once
out = {"loader": kind, "dtype": str(dtype), "seconds": round(seconds, 1), "rss_after_imports_mb": round(before),
       "peak_rss_mb": round(after), "peak_rss_increase_mb": round(after - before), "fp32_model_mb": round(params * 4 / 2**20)}
if with_ppl:
    out["perplexity"] = perplexity(model, eval_token_ids(tokenizer))
print(json.dumps(out))
"""


def measure(kind: str, dtype: str, with_perplexity: bool) -> dict:
    """One load in a fresh process: its time, peak RSS and (optionally) perplexity on the eval text."""
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, dtype, "1" if with_perplexity else "0"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--perplexity", action="store_true", help="also the bf16 perplexity of both loaders (slow)")
    args = parser.parse_args()
    runs = [("load_gguf", "bfloat16"), ("load_gguf", "float32"), ("transformers", "bfloat16")]
    for kind, dtype in runs:
        print(json.dumps(measure(kind, dtype, args.perplexity and dtype == "bfloat16")), flush=True)


if __name__ == "__main__":
    main()
