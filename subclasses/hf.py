"""``subclasses.hf`` is ``subclasses.io.hf``: the public path, kept short."""

import sys

from .io import hf as _module

sys.modules[__name__] = _module
