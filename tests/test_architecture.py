"""The layering of docs/architecture.md, read from the source: no import cycle in src/deepgm (function-level imports
included), and the run layer neither imports a model family nor asks a model for its type."""

import ast
from pathlib import Path

import deepgm

SRC = Path(deepgm.__file__).parent
# below the families. deepgm.cli sits on top (it names samplers and grids in its help); deepgm.data.toy's oracle
# `GaussianMixture.denoiser` wraps the exact posterior mean in a diffusion Denoiser, on first use.
RUN_LAYER = ("deepgm.pipeline", "deepgm.family", "deepgm.models", "deepgm.conditioning", "deepgm.config",
             "deepgm.options", "deepgm.likelihood", "deepgm.files", "deepgm.data", "deepgm.data.base",
             "deepgm.data.digits", "deepgm.data.files", "deepgm.train", "deepgm.train.trainer",
             "deepgm.train.checkpoint", "deepgm.train.distributed", "deepgm.eval", "deepgm.viz")
FAMILIES = ("deepgm.diffusion", "deepgm.vae")
FAMILY_CLASSES = {"DiffusionModel", "LatentVariableModel", "VAE", "HVAE", "PixelCNNVAE", "Denoiser"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The deepgm modules `name` imports anywhere in its body. `from pkg import sub` imports the submodule pkg.sub
    (Python runs pkg/__init__ first, but a package's __init__ only re-exports: the module is the dependency)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = {f"{base}.{a.name}" for a in node.names}
            out |= {m for m in names if m in MODULES}  # submodules; any other name comes from the module itself
            if names - set(MODULES):
                out.add(base)
    return {m for m in out if m in MODULES and m != name}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the cycles of the graph as its strongly connected components of size > 1."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found




def test_the_cycle_finder_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_src():
    assert strongly_connected({m: imports(m) for m in MODULES}) == []


def test_the_run_layer_imports_no_model_family():
    for name in RUN_LAYER:
        family_imports = sorted(m for m in imports(name) if m.startswith(FAMILIES))
        assert family_imports == [], f"{name} imports {family_imports}"


def test_no_family_isinstance_outside_its_family():
    for name, path in MODULES.items():
        if name.startswith(FAMILIES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                assert not names & FAMILY_CLASSES, f"{name} line {node.lineno}: isinstance on {names & FAMILY_CLASSES}"
