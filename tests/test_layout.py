"""The package layout: documented import paths, no import cycles, layers importing only downward."""

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("unwrap", "subclasses", "perf")

# Each part of subclasses may import only the parts listed for it (its docstring says so too).
ALLOWED = {
    "kernels": set(),
    "formats": {"kernels"},
    "runtime": {"kernels", "formats"},
    "quantize": {"kernels", "formats", "runtime"},
    "io": {"kernels", "formats", "runtime", "quantize"},
}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The repository modules ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle_in_the_repository():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(name) :], name]))
        if name in done:
            return
        for dependency in sorted(graph[name]):
            # a package's __init__ importing its own modules is not a cycle through them
            if not dependency.startswith(name + "."):
                visit(dependency, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_subclasses_parts_import_only_the_layers_below():
    modules = _modules()
    for name, path in modules.items():
        parts = name.split(".")
        if parts[0] != "subclasses" or len(parts) < 3:
            continue
        for dependency in _imports(name, path, modules):
            other = dependency.split(".")
            if other[0] == "subclasses" and len(other) > 1 and other[1] in ALLOWED and other[1] != parts[1]:
                assert other[1] in ALLOWED[parts[1]], f"{name} imports {dependency}"


@pytest.mark.parametrize(
    "path, names",
    [
        ("subclasses", None),  # every name in __all__
        ("unwrap", None),
        ("subclasses.decode", ["compile_for_decode", "compile_decode_step", "GreedyDecoder"]),
        ("subclasses.int4_tensor", ["Int4WeightTensor"]),  # the flat paths of earlier releases
        ("subclasses.int8_tensor", ["Int8WeightTensor"]),
        ("subclasses.quant_api", ["quantize_"]),
        ("subclasses.serialization", ["save_checkpoint", "load_checkpoint"]),
    ],
)
def test_documented_import_paths(path, names):
    module = importlib.import_module(path)
    for name in names if names is not None else module.__all__:
        assert getattr(module, name) is not None, f"{path}.{name}"


def test_integrations_import_on_demand():
    """Importing our packages (the core, unwrap, the torchao bridge's module, the benchmarks' tables)
    imports no optional extra: not transformers, gguf or torchao. ``subclasses.hf`` and ``load_gguf``
    import theirs when asked. One fresh interpreter for all of it (each start imports torch again)."""
    code = (
        "import sys, subclasses, subclasses.decode, subclasses.io.torchao, unwrap, unwrap.linear\n"
        "import perf.workloads, perf.modes, perf.bench_torchao\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'gguf', 'torchao'))\n"
        "assert not loaded, f'imported at import: {loaded}'\n"
        "import subclasses.hf as hf; assert hf.attach and hf.__name__ == 'subclasses.io.hf'\n"
        "assert callable(subclasses.load_gguf)\n"
    )
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
