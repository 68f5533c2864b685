"""``subclasses.decode`` is ``subclasses.runtime.decode``: the public path, kept short."""

import sys
from typing import TYPE_CHECKING

from .runtime import decode as _module

if TYPE_CHECKING:  # what type checkers see; at run time the name is the module itself
    from .runtime.decode import *  # noqa: F403

sys.modules[__name__] = _module
