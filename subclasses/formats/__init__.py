"""The quantized weight formats: tensor subclasses, their op tables and their portable (checkpoint) form.

Owns ``QuantizedWeight`` (declared inner tensors and attributes, derived flatten/unflatten, op tables)
and one module per format. May import ``subclasses.kernels`` and torch; nothing above it.
"""

from . import base, sharding_ops  # noqa: F401 - the base op table, complete before any format is defined
