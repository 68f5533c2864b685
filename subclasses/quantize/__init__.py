"""Turning a model's high-precision weights into quantized ones: ``quantize_``, the configs, GPTQ.

May import ``subclasses.formats``, ``subclasses.kernels`` and ``subclasses.runtime.tensor_parallel``
(weights that are DTensors); never an integration (``subclasses.io``): those register a hook instead
(``register_quantized_model_hook``).
"""
