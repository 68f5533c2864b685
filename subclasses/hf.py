"""``subclasses.hf`` is ``subclasses.io.hf``: the public path, kept short."""

import sys
from typing import TYPE_CHECKING

from .io import hf as _module

if TYPE_CHECKING:  # what type checkers see; at run time the name is the module itself
    from .io.hf import *  # noqa: F403

sys.modules[__name__] = _module
