import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.testing._internal.two_tensor import TwoTensor

from subclasses import Int4WeightOnlyConfig, Int4WeightTensor, Int8WeightOnlyConfig, quantize_
from tests.conftest import sqnr
from tests.optional import import_or_fail_in_ci
from unwrap import rewrap, unwrap, unwrap_tensor_subclass_parameters

CONFIGS = {"int4": Int4WeightOnlyConfig(group_size=64), "int8": Int8WeightOnlyConfig()}


def quantized_model(fmt="int4"):
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)).to(torch.bfloat16)
    return quantize_(model, CONFIGS[fmt])


def assert_state_dicts_equal(a, b):
    assert list(a) == list(b)
    for key in a:
        assert type(a[key]) is type(b[key]), key
        da = a[key].dequantize() if hasattr(a[key], "inner_tensors") else a[key]
        db = b[key].dequantize() if hasattr(b[key], "inner_tensors") else b[key]
        assert torch.equal(da, db), key


def plain_inputs(model):
    return {name: t for name, t in model.named_parameters()}


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_state_dict_keys_and_values_unchanged(fmt):
    model = quantized_model(fmt)
    before = model.state_dict()
    unwrap(model)
    assert all(type(t) in (torch.Tensor, nn.Parameter) for t in model.parameters())
    assert_state_dicts_equal(before, model.state_dict())


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_checkpoints_cross_load_both_ways(fmt):
    source = quantized_model(fmt)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = source(x)
    wrapped_ckpt = io.BytesIO()
    torch.save(source.state_dict(), wrapped_ckpt)

    target = unwrap(quantized_model(fmt))  # other random weights
    wrapped_ckpt.seek(0)
    target.load_state_dict(torch.load(wrapped_ckpt, weights_only=False))
    with torch.no_grad():
        assert torch.equal(target(x), expected)

    unwrapped_ckpt = io.BytesIO()
    torch.save(target.state_dict(), unwrapped_ckpt)
    back = quantized_model(fmt)
    unwrapped_ckpt.seek(0)
    back.load_state_dict(torch.load(unwrapped_ckpt, weights_only=False))
    with torch.no_grad():
        assert torch.equal(back(x), expected)


def test_load_of_wrong_format_reports_the_key():
    model = unwrap(quantized_model("int4"))
    wrong = quantized_model("int8").state_dict()
    with pytest.raises(RuntimeError, match=r'"0\.weight"'):
        model.load_state_dict(wrong)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 64, bias=False)
        self.head = nn.Linear(64, 128, bias=False)
        self.head_copy = nn.Linear(64, 128, bias=False)
        self.head_copy.weight = self.head.weight

    def forward(self, x):
        h = self.body(x)
        return self.head(h) - self.head_copy(h)


def unique_storages(model):
    return {t.untyped_storage().data_ptr() for t in model.parameters()}


def test_tied_weight_stays_one_set_of_plain_tensors():
    model = quantize_(TiedLM().bfloat16(), Int4WeightOnlyConfig(group_size=64))
    inner_per_weight = 2
    unwrap(model)
    params = list(model.parameters())
    assert len(params) == len({id(p) for p in params}) == 2 * inner_per_weight
    assert model.head.weight__packed is model.head_copy.weight__packed
    assert len(unique_storages(model)) == 2 * inner_per_weight
    model.load_state_dict(quantize_(TiedLM().bfloat16(), Int4WeightOnlyConfig(group_size=64)).state_dict())
    assert model.head.weight__packed is model.head_copy.weight__packed
    assert model.head.weight is model.head_copy.weight
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), torch.zeros(2, 128, dtype=torch.bfloat16))
    rewrap(model)
    assert model.head.weight is model.head_copy.weight
    assert isinstance(model.head.weight, Int4WeightTensor)


def test_tied_weight_stays_tied_across_a_move_to_meta():
    """The meta device takes new plain tensors (`.data` cannot cross): both owners get the same."""
    model = unwrap(quantize_(TiedLM().bfloat16(), Int4WeightOnlyConfig(group_size=64))).to("meta")
    assert model.head.weight__packed is model.head_copy.weight__packed
    assert model.head.weight__packed.device.type == "meta"
    assert len(list(model.parameters())) == 4  # body + head, two inner tensors each


class WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("kept", TwoTensor(torch.randn(4), torch.randn(4)))
        self.register_buffer("scratch", TwoTensor(torch.randn(4), torch.randn(4)), persistent=False)

    def forward(self, x):
        return x + self.kept + self.scratch


def test_non_persistent_buffers_stay_non_persistent():
    model = WithBuffers()
    before = model.state_dict()
    unwrap(model)
    assert list(model.state_dict()) == list(before) == ["kept"]
    assert sorted(n for n, _ in model.named_buffers()) == ["kept__a", "kept__b", "scratch__a", "scratch__b"]
    rewrap(model)
    assert list(model.state_dict()) == ["kept"]


def test_inner_parameters_unwrap_twice_and_untouched_modules():
    inner = TwoTensor(nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8)))
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[0].weight = nn.Parameter(inner)
    plain_class = type(model[1])
    unwrap(model)
    names = [n for n, _ in model.named_parameters()]
    unwrap(model)
    assert [n for n, _ in model.named_parameters()] == names
    assert type(model[1]) is plain_class
    assert isinstance(model[0].weight, TwoTensor)
    empty = nn.Linear(3, 3)
    assert unwrap(empty) is empty and type(empty) is nn.Linear


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_rebuilt_weight_never_stale(fmt):
    model = unwrap(quantized_model(fmt))
    layer = model[0]
    first = layer.weight
    assert layer.weight is first  # cached in eager
    name = "weight__packed" if fmt == "int4" else "weight__qdata"
    other = quantized_model(fmt)[0].weight
    with torch.no_grad():
        getattr(layer, name).copy_(getattr(other, name.split("__")[1]))  # in place
    inner = name.split("__")[1]
    assert torch.equal(getattr(layer.weight, inner), getattr(other, inner))
    fresh = quantized_model(fmt)[0].weight
    setattr(layer, name, nn.Parameter(getattr(fresh, name.split("__")[1]).clone(), requires_grad=False))
    rebuilt = layer.weight
    assert rebuilt is not first
    assert getattr(rebuilt, name.split("__")[1]) is getattr(layer, name)


def test_a_dropped_unwrapped_model_frees_its_weights():
    """The eager cache lives on the module: nothing global keeps a dropped model's tensors alive."""
    import gc
    import weakref

    model = unwrap(quantized_model("int4"))
    with torch.no_grad():
        model(torch.randn(2, 128, dtype=torch.bfloat16))  # fills the cache
    packed = weakref.ref(model[0].weight__packed)
    del model
    gc.collect()
    assert packed() is None


def test_assigning_a_new_subclass_routes_through_and_plain_raises():
    model = unwrap(quantized_model("int8"))
    new = quantized_model("int8")[0].weight
    model[0].weight = new
    assert torch.equal(model[0].weight.dequantize(), new.dequantize())
    assert model[0].weight__qdata is not None and "weight" not in model[0]._parameters
    with pytest.raises(TypeError, match="unwrapped tensor subclass"):
        model[0].weight = nn.Parameter(torch.randn(256, 128))


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_compiled_graph_takes_plain_tensors_no_breaks_no_recompiles(fmt):
    model = unwrap(quantized_model(fmt))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([type(t) for t in example_inputs])
        return gm.forward

    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        outs = [compiled(x) for _ in range(3)]
    assert len(graphs) == 1
    assert all(t in (torch.Tensor, nn.Parameter) for t in graphs[0])
    for out in outs:
        torch.testing.assert_close(out, expected)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), expected, rtol=2e-2, atol=2e-2)


def test_new_metadata_recompiles_never_stale():
    """Same inner shapes and dtypes, other metadata (the packing): the compiled model must notice."""
    from subclasses.kernels.int4_packing import pack_canonical

    model = unwrap(quantized_model("int4"))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        compiled(x)
        w = model[0].weight
        canonical = Int4WeightTensor(
            pack_canonical(w.codes()), w.scale_and_zero, w.group_size, "canonical", tuple(w.shape), w.dtype
        )
        assert canonical.packed.shape == w.packed.shape and canonical.packed.dtype == w.packed.dtype
        model[0].weight = canonical
        out = compiled(x)
        torch.testing.assert_close(out, model(x))
    assert model[0].weight.packing == "canonical"
    assert len(compiles) == 2


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_export_of_unwrapped_quantized_model(fmt):
    model = unwrap(quantized_model(fmt))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected)


def test_dtype_move_of_unwrapped_model_converts_the_subclass():
    model = unwrap(quantized_model("int4"))
    model.half()
    assert model[0].weight.dtype == torch.float16 and model[0].weight__scale_and_zero.dtype == torch.float16
    x = torch.randn(2, 128, dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), rewrap(copy.deepcopy(model))(x))


class Nested(nn.Module):
    """torch's own nested case: TwoTensor parameters nested two and three deep."""

    def __init__(self):
        super().__init__()
        a = TwoTensor(torch.randn(8, 8), torch.randn(8, 8))
        self.p2 = nn.Parameter(TwoTensor(a, TwoTensor(torch.randn(8, 8), torch.randn(8, 8))))
        b = TwoTensor(TwoTensor(torch.randn(8, 8), torch.randn(8, 8)), TwoTensor(torch.randn(8, 8), torch.randn(8, 8)))
        self.p3 = nn.Parameter(TwoTensor(b, TwoTensor(TwoTensor(torch.randn(8, 8), torch.randn(8, 8)), a.clone())))

    def forward(self, x):
        return (x @ self.p2).sin(), (x @ self.p3).cos()


def _grads(model):
    out = {}
    for name, p in model.named_parameters():
        leaves = [p.grad]
        while any(isinstance(t, TwoTensor) for t in leaves):
            leaves = [part for t in leaves for part in ((t.a, t.b) if isinstance(t, TwoTensor) else (t,))]
        out[name.split("__")[0]] = out.get(name.split("__")[0], []) + leaves
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("compile_backend", [None, "aot_eager"])
def test_nested_two_tensor_outputs_and_gradients_equal(compile_backend):
    reference = Nested()
    unwrapped = unwrap(copy.deepcopy(reference))
    results = []
    for model in (reference, unwrapped):
        run = model if compile_backend is None else torch.compile(model, backend=compile_backend, fullgraph=True)
        x = torch.ones(4, 8).requires_grad_()
        outs = run(x)
        torch.autograd.backward([out.sum() for out in outs])
        results.append((outs, x.grad))
    (outs_ref, grad_ref), (outs_unw, grad_unw) = results
    for out_ref, out_unw in zip(outs_ref, outs_unw):
        torch.testing.assert_close(out_unw, out_ref)
    torch.testing.assert_close(grad_unw, grad_ref)
    if compile_backend is None:  # eager also splits the parameters' gradients onto the plain tensors
        grads_ref, grads_unw = _grads(reference), _grads(unwrapped)
        assert grads_ref.keys() == grads_unw.keys()
        for name in grads_ref:
            torch.testing.assert_close(grads_unw[name], grads_ref[name])


def test_rewrap_restores_exactly():
    model = quantized_model("int4")
    names = [n for n, _ in model.named_parameters()]
    classes = [type(m) for m in model.modules()]
    before = model.state_dict()
    rewrap(unwrap_tensor_subclass_parameters(model))
    assert [n for n, _ in model.named_parameters()] == names
    assert [type(m) for m in model.modules()] == classes
    assert_state_dicts_equal(before, model.state_dict())


class NestedGradientDiffers(nn.Module):
    """torch's own case: the gradient of ``p2`` (a TwoTensor of plain tensors) comes back nested
    like ``p1`` (a TwoTensor of a TwoTensor), so it cannot be split onto p2's plain tensors."""

    def __init__(self):
        super().__init__()
        self.p1 = nn.Parameter(TwoTensor(TwoTensor(torch.randn(3, 4), torch.randn(3, 4)), torch.randn(3, 4)))
        self.p2 = nn.Parameter(TwoTensor(torch.randn(3, 4), torch.randn(3, 4)))
        self.p3 = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return x + 2 * self.p1 + self.p2 + self.p3


@pytest.mark.parametrize("compile_backend", [None, "aot_eager"])
def test_gradient_nested_differently_warns_once_and_leaves_none(compile_backend, monkeypatch):
    from unwrap import spec as spec_module

    monkeypatch.setattr(spec_module, "_WARNED_UNMAPPED", set())
    reference = NestedGradientDiffers()
    unwrapped = unwrap(copy.deepcopy(reference))
    results = []
    for model in (reference, unwrapped):
        run = model if compile_backend is None else torch.compile(model, backend=compile_backend, fullgraph=True)
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # a second backward: no second warning
                x.grad = None
                model.zero_grad(set_to_none=True)
                out = run(x)
                out.sum().backward()
        results.append((out, x.grad, [str(w.message) for w in caught]))
    (out_ref, grad_ref, _), (out_unw, grad_unw, messages) = results
    torch.testing.assert_close(out_unw, out_ref)
    torch.testing.assert_close(grad_unw, grad_ref)
    grads = {name: p.grad for name, p in unwrapped.named_parameters()}
    torch.testing.assert_close(grads["p3"], reference.p3.grad)
    if compile_backend is None:
        # p1's gradient nests like p1: split onto its plain tensors, equal to the reference's parts
        torch.testing.assert_close(grads["p1__a__a"], reference.p1.grad.a.a)
        torch.testing.assert_close(grads["p1__b"], reference.p1.grad.b)
        # p2's does not: None, and one warning naming the class and the plain tensors
        assert grads["p2__a"] is None and grads["p2__b"] is None
        unmapped = [m for m in messages if "does not map onto its plain tensors" in m]
        assert len(unmapped) == 1 and "TwoTensor" in unmapped[0] and "['a', 'b']" in unmapped[0]
    else:
        # compiled, the subclass is rebuilt inside the graph by its (non-differentiable) constructor:
        # the plain tensors of unwrapped subclass parameters get no gradient (documented in docs/unwrap.md)
        assert all(g is None for name, g in grads.items() if "__" in name)


class Recipe:
    """Metadata Dynamo cannot pass to a subclass constructor it traces ("Failed to convert
    args/kwargs to proxy"), as with torchao's ``act_quant_kwargs``; equal by value, so the
    wrapped weight's metadata guard holds."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and other.scale == self.scale

    def __hash__(self) -> int:
        return hash(self.scale)


class RecipeTensor(torch.Tensor):
    """A traceable wrapper subclass whose flatten metadata holds a ``Recipe``; every op unwraps."""

    @staticmethod
    def __new__(cls, inner, recipe):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner, recipe):
        self.inner, self.recipe = inner, recipe

    def __tensor_flatten__(self):
        return ["inner"], {"recipe": self.recipe}

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return RecipeTensor(inner_tensors["inner"], meta["recipe"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:  # nn.Parameter needs detach to keep the type
            return RecipeTensor(args[0].inner.detach(), args[0].recipe)
        unwrap_one = lambda t: t.inner * t.recipe.scale if isinstance(t, RecipeTensor) else t  # noqa: E731
        return func(
            *torch.utils._pytree.tree_map(unwrap_one, args), **torch.utils._pytree.tree_map(unwrap_one, kwargs or {})
        )


def recipe_model():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    model[1].weight = nn.Parameter(RecipeTensor(torch.randn(4, 8), Recipe(0.5)), requires_grad=False)
    return model


def test_unwrapping_non_constant_metadata_would_break_fullgraph(monkeypatch):
    """Why the rule exists: forced through, unwrap turns a model that compiles into one that does not."""
    from unwrap import register

    monkeypatch.setattr(register, "untraceable_metadata", lambda tensor: None)
    model = unwrap(recipe_model())
    with pytest.raises(Exception, match="proxy"), torch.no_grad():
        torch.compile(model, fullgraph=True, backend="aot_eager")(torch.randn(3, 8))


def test_subclass_with_non_constant_metadata_stays_wrapped_and_compiles():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    model[1].weight = nn.Parameter(RecipeTensor(torch.randn(4, 8), Recipe(0.5)), requires_grad=False)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(
        UserWarning, match=r"left 1 tensor\(s\) wrapped.*1\.weight \(a Recipe in RecipeTensor's metadata\)"
    ):
        unwrap(model)
    assert isinstance(model[1].weight, nn.Parameter) and isinstance(model[1].weight, RecipeTensor)
    assert "weight" in model[1]._parameters  # still an ordinary parameter, not plain tensors
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), expected)


def test_torchao_w8a8_weight_stays_wrapped_and_fullgraph_compiles():
    """torchao's Int8Tensor with act_quant_kwargs (a dataclass in its metadata): torch's own unwrap
    breaks fullgraph there; ours leaves it wrapped, with the warning."""
    import_or_fail_in_ci("torchao", "torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig as AoW8A8
    from torchao.quantization import quantize_ as ao_quantize_

    model = nn.Sequential(nn.Linear(128, 64)).to(torch.bfloat16)
    ao_quantize_(model, AoW8A8(version=2))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match=r"0\.weight \(a QuantizeTensorToInt8Kwargs"):
        unwrap(model)
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True)(x)
    assert sqnr(expected, out) > 35  # inductor fuses torchao's activation quantization differently
