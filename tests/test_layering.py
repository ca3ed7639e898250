"""Dependencies point one way: models, kernels <- engine <- export <- command lines, training.

Every module of the installed package (admrt/, engine/, export/, training/, kernels/: the import
root `admrt` and the folders setup.py maps into it) is parsed, not imported, and each import in
it counts, lazy ones (inside functions) included: a lazy import is still a dependency.

Units. A top-level subpackage is one unit (admrt.models, admrt.engine, ...); so is each top-level
module of admrt (admrt.config, admrt.checkpoint, ...); the command lines (admrt.cli, every
subpackage's cli.py, and admrt.stack_loading, the model loading they share) are one unit, "cli".
The package roots' __init__ files are not nodes: Python imports a package's __init__ before any
of its modules anyway, and admrt/__init__.py is the public facade over every layer. An
`import admrt` followed by `admrt.NAME` (or `from admrt import NAME`) counts as an import of the
module the facade takes NAME from.

Asserted: no cycle among units; no unit imports one of a higher layer (LAYERS); no cycle among
modules (one exception, below); no module imports another module's private name (`_x`) except
its own package's private submodules; guided_diffusion is imported only by
the adapter admrt.models.guided_diffusion, and only inside a function.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"admrt": "admrt", "engine": "admrt.engine", "export": "admrt.export", "training": "admrt.training",
           "kernels": "admrt.kernels"}
SKIP_DIRS = {"csrc", "examples", "cpp", "bundled", "__pycache__"}
# Lower layers first; a unit may import its own layer's units and those below, never above.
LAYERS = [
    # core: admrt.core, the compiled binding of libadmrt (engine/csrc): the driver, the step plan,
    # the run folder. It imports nothing of admrt, so every layer may use it.
    {"core", "models", "kernels", "config", "presets", "checkpoint", "io", "diffusion", "gd_flags", "distributed"},
    {"engine"},
    {"export"},
    {"training", "evaluation", "cli"},
]
# admrt.engine.serve: `admrt serve`, a front end like `admrt sample` (engine/cli.py).
CLI_MODULES = {"admrt.cli", "admrt.stack_loading", "admrt.engine.serve", "admrt.engine.cache_cli"}
ADAPTER = "admrt.models.guided_diffusion"
# (importer, imported) edges allowed to break the rules: none.
KNOWN: set[tuple[str, str]] = set()


def discover(root: Path) -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package __init__)."""
    mods = {}
    for folder, pkg in FOLDERS.items():
        for f in sorted((root / folder).rglob("*.py")):
            parts = list(f.relative_to(root / folder).with_suffix("").parts)
            if SKIP_DIRS & set(parts[:-1]) or (folder == "admrt" and parts[0] in FOLDERS):
                continue
            is_pkg = parts[-1] == "__init__"
            name = ".".join([pkg] + (parts[:-1] if is_pkg else parts))
            mods[name] = (f, is_pkg)
    return mods


class Import:
    def __init__(self, importer, target, names, line, lazy):
        self.importer, self.target, self.names, self.line, self.lazy = importer, target, names, line, lazy

    def __repr__(self):
        return f"{self.importer}:{self.line} -> {self.target} {self.names or ''}"


def _facade_names(mods) -> dict[str, str]:
    """Names admrt/__init__.py takes from its modules (eagerly or in __getattr__) -> that module."""
    path, _ = mods["admrt"]
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for a in node.names:
                out[a.asname or a.name] = f"admrt.{node.module}"
    return out


def imports(mods) -> list[Import]:
    facade = _facade_names(mods)
    found = []
    for name, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text())
        package = name if is_pkg else name.rpartition(".")[0]
        lazy_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for n in ast.walk(f)}
        imports_admrt = False
        for node in ast.walk(tree):
            lazy = id(node) in lazy_nodes
            if isinstance(node, ast.Import):
                for a in node.names:
                    found.append(Import(name, a.name, [], node.lineno, lazy))
                    imports_admrt |= a.name == "admrt" and a.asname is None
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module
                for a in node.names:
                    sub = f"{module}.{a.name}"
                    if sub in mods:
                        target = sub
                    elif module == "admrt" and a.name in facade:
                        target = facade[a.name]
                    else:
                        target = module
                    found.append(Import(name, target, [a.name], node.lineno, lazy))
        if imports_admrt:  # admrt.NAME through the facade
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "admrt"
                        and node.attr in facade):
                    found.append(Import(name, facade[node.attr], [node.attr], node.lineno, True))
    return found


def unit_of(module: str) -> str | None:
    """The unit of an admrt module (None: the facade admrt/__init__.py, or not admrt's)."""
    parts = module.split(".")
    if parts[0] != "admrt" or len(parts) == 1:
        return None
    if module in CLI_MODULES or parts[-1] == "cli":
        return "cli"
    return parts[1]


def owner(module: str, mods) -> str | None:
    """The module an import target names, or the package whose __init__ it is, among `mods`."""
    while module and module not in mods:
        module = module.rpartition(".")[0]
    return module or None


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    mods = discover(ROOT)
    assert {"admrt.engine.engine", "admrt.models.unet", "admrt.export.onnx"} <= set(mods), sorted(mods)[:20]
    return mods, imports(mods)


def _admrt_edges(mods, found):
    """(importer, imported module, Import) for the imports of admrt modules, facade excluded."""
    for imp in found:
        target = owner(imp.target, mods) if imp.target.startswith("admrt") else None
        if target is None or "admrt" in (target, imp.importer) or (imp.importer, target) in KNOWN:
            continue
        yield imp.importer, target, imp


def test_no_cycles_among_units(graph):
    mods, found = graph
    edges, where = {}, {}
    for src, dst, imp in _admrt_edges(mods, found):
        a, b = unit_of(src), unit_of(dst)
        if a and b and a != b:
            edges.setdefault(a, set()).add(b)
            where.setdefault((a, b), imp)
    cycles = _cycles(edges)
    detail = [[where[(a, b)] for a in c for b in c if (a, b) in where] for c in cycles]
    assert not cycles, f"import cycles among units: {cycles}; through {detail}"


def test_units_import_only_their_layer_and_below(graph):
    mods, found = graph
    rank = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    units = {unit_of(m) for m in mods} - {None}
    assert units <= set(rank), f"units with no layer (add them to LAYERS): {sorted(units - set(rank))}"
    upward = [imp for src, dst, imp in _admrt_edges(mods, found)
              if rank[unit_of(src)] < rank[unit_of(dst)]]
    assert not upward, "imports of a higher layer:\n" + "\n".join(map(repr, upward))


def test_no_cycles_among_modules(graph):
    mods, found = graph
    edges = {}
    for src, dst, _ in _admrt_edges(mods, found):
        if src != dst and not mods[dst][1] and not mods[src][1]:   # package __init__s are facades
            edges.setdefault(src, set()).add(dst)
    assert not _cycles(edges), f"import cycles among modules: {_cycles(edges)}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_another_modules_private_names(graph):
    mods, found = graph
    bad = []
    for imp in found:
        if not imp.target.startswith("admrt"):
            continue
        package = imp.importer if mods[imp.importer][1] else imp.importer.rpartition(".")[0]
        home = owner(imp.target, mods)
        if (imp.importer, home) in KNOWN:
            continue
        # a private module (admrt.kernels._trace) only from inside its own package
        parts = imp.target.split(".")
        first = next((i for i, p in enumerate(parts) if _private(p)), None)
        if first is not None:
            home_package = ".".join(parts[:first])
            if package != home_package and not package.startswith(home_package + "."):
                bad.append(imp)
                continue
        # a private name only from the importer's own package (its private submodules)
        if any(_private(n) for n in imp.names) and imp.target != package:
            bad.append(imp)
    assert not bad, "imports of private names:\n" + "\n".join(map(repr, bad))


def test_guided_diffusion_is_imported_only_by_the_adapter_and_lazily(graph):
    _, found = graph
    bad = [imp for imp in found if imp.target.split(".")[0] == "guided_diffusion"
           and (imp.importer != ADAPTER or not imp.lazy)]
    assert not bad, f"guided_diffusion imported outside {ADAPTER} (or at its top):\n" + "\n".join(map(repr, bad))


def test_engine_runs_without_export_until_a_compiled_backend_is_asked_for():
    """Importing the engine imports no exporter; the compiled backends export provides are there
    by name right after `import admrt` (admrt.engine.backends.PROVIDERS)."""
    import subprocess
    import sys

    code = ("import sys, admrt, admrt.engine\n"
            "assert not [m for m in sys.modules if m.startswith('admrt.export')], sorted(sys.modules)\n"
            "from admrt.engine.backends import backend_names, get_backend\n"
            "assert {'aoti', 'onnxruntime', 'tensorrt'} <= set(backend_names())\n"
            "assert get_backend('onnxruntime').capturable is False\n"
            "assert 'admrt.export.backends' in sys.modules and get_backend('aoti') and get_backend('tensorrt')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
