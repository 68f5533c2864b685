"""Building this package's C++ ops at first use (``torch.utils.cpp_extension.load``: ~20-30 s, then
cached under ``TORCH_EXTENSIONS_DIR``, ~/.cache/torch_extensions by default). Each op has a PyTorch
path that runs where the build fails."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path


def build_library(name: str, sources: Sequence[Path], cflags: Sequence[str], what: str, instead: str) -> bool:
    """Compile and load the operator library ``name`` from ``sources`` (with OpenMP, which
    ``at::parallel_for`` uses); True once loaded. Where it cannot be built (no compiler, no headers)
    warns "building ``what`` failed (the error); ``instead``" and returns False."""
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=name,
            sources=[str(source) for source in sources],
            extra_cflags=[*cflags, "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # the caller's PyTorch path gives the same result
        warnings.warn(f"building {what} failed ({error!r}); {instead}", stacklevel=3)
        return False
    return True
