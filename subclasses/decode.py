"""``subclasses.decode`` is ``subclasses.runtime.decode``: the public path, kept short."""

import sys

from .runtime import decode as _module

sys.modules[__name__] = _module
