"""Running quantized models: the compiled decode step, its ``model.generate(custom_generate=...)`` loop,
fused decode projections, tensor parallelism.

May import ``subclasses.formats`` and ``subclasses.kernels``. Never imports transformers at import
time: the decode step reads a model's attention functions from the model's own module.
"""
