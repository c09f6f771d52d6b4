"""The package map as a test: which package may import which (the layer order of docs/architecture.md).

Every module of ``deepgen_rl`` is read as source (its AST: module-level, function-local and ``TYPE_CHECKING``
imports alike, none executed) and each ``deepgen_rl`` import is checked against ``LAYERS``. ``LAYERS`` lists the
packages from the bottom up; a package may import only packages listed above it, so no arrow runs back up and
no two packages import each other. The modules must not import each other in a circle either (inside a package
too), and the package root keeps at most ``MAX_ROOT_MODULES`` modules: what a user names.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "deepgen_rl"
ROOT = "deepgen_rl"  # the root modules: the entry points a user names (grpo_deepgen, estimate_memory, launch)

# package: the packages it may import. From the bottom up: each package may import only packages listed above it.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": (),                                                      # distributed, SDE checks, env names, grids
    "rewards.servers.scorers": (),                                   # model scorers (run inside the servers)
    "monitor": (),                                                   # reward-hacking statistics and alarms
    "rewards": ("core",),                                            # reward functions and clients; names.py
    "rewards.servers": ("rewards", "rewards.servers.scorers"),       # the OCR / model scorer HTTP servers
    "data": ("core", "rewards"),                                     # dataset YAMLs, prompts (reward names)
    "sft": ("core",),                                                # SFT-aux image-caption data
    "rl": ("core",),                                                 # advantages, losses, trained steps
    "sampling": ("core", "data"),                                    # rollouts, SDE/ODE steps
    "model": ("core", "rewards", "rl"),                              # DeepGen, loading, the tiny model
    "config": ("core", "rewards", "rl", "sampling"),                 # every flag and its checks
    "perf": ("core", "sampling"),                                    # FLOPs by phase (meta model), bytes, MFU
    "eval": ("core", "config", "data", "model", "rewards", "sampling"),         # UniGenBench, synthetic report
    "trainer": ("core", "config", "data", "eval", "model", "monitor", "perf", "rewards", "rl", "sampling"),
    "estimate": ("core", "config", "perf", "trainer"),               # the estimator's compute half (--compute)  # steps, run loop
    "preflight": ("core", "config", "data", "eval", "model", "rewards", "sft", "trainer"),  # launch checks
    ROOT: ("core", "config", "data", "estimate", "eval", "model", "preflight", "rewards", "sft", "trainer"),
}
MAX_ROOT_MODULES = 6  # __init__.py included
LEAF_MODULES = ("deepgen_rl.rewards.names",)  # read by the layers above the rewards: import nothing of ours


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name -> its file, for every module of the package (a package is its ``__init__``; .py files
    in folders without one, such as the SFT-aux dataset configs, are data, not modules)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        folders = [folder for folder in path.parents if folder.is_relative_to(package_dir)]
        if not all((folder / "__init__.py").is_file() for folder in folders):
            continue
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that ``name`` imports anywhere in its source. ``from P import n`` runs P, so it
    counts as P, and as P.n too when that is a module; a name that is no module is its longest module prefix."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def known(dotted: str) -> str:
        while dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {known(alias.name) for alias in node.names if alias.name.split(".")[0] == ROOT}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != ROOT:
                continue
            found.add(known(base))
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules}
    found.discard(name)
    return found


def package_of(module: str, modules: dict[str, Path]) -> str:
    """The package a module sits in, relative to the root ("trainer", "rewards.servers"); ROOT for root modules."""
    is_package = modules[module].name == "__init__.py"
    parts = module.split(".")[1:] if is_package else module.split(".")[1:-1]
    return ".".join(parts) or ROOT


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    modules = module_files(package_dir)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:  # recursion depth <= the number of modules (~200)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_graph(graph: dict[str, set[str]], modules: dict[str, Path]) -> dict[str, set[str]]:
    """Package -> the other packages its modules import (root modules each their own node, as entry points)."""
    def node(module: str) -> str:
        package = package_of(module, modules)
        return module if package == ROOT and module != ROOT else package

    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(node(module), set()).update(node(t) for t in targets if node(t) != node(module))
    return packages


def layer_violations(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Each import of a package not in its LAYERS entry (or of a package missing from LAYERS), as text."""
    modules = module_files(package_dir)
    problems = []
    for module, targets in import_graph(package_dir).items():
        source = package_of(module, modules)
        if source not in LAYERS:
            problems.append(f"{module}: package {source!r} is not in LAYERS")
            continue
        for target in sorted(targets):
            package = package_of(target, modules)
            if package != source and package not in LAYERS[source]:
                problems.append(f"{module} imports {target} ({source} -> {package} is not in LAYERS)")
    return problems


def test_layer_table_runs_one_way():
    """The table itself: each package names only packages listed above it (so it has no circle)."""
    order = list(LAYERS)
    for package, allowed in LAYERS.items():
        assert not [a for a in allowed if a not in order[:order.index(package)]], (package, allowed)


def test_every_import_follows_the_layers():
    problems = layer_violations()
    assert not problems, "imports outside the layer table (tests/test_layers.py, docs/architecture.md):\n" + \
        "\n".join(problems)


def test_no_module_imports_itself_in_a_circle():
    found = circles(import_graph())
    assert not found, f"module import circles: {found}"


def test_no_package_imports_itself_in_a_circle():
    modules = module_files()
    found = circles(package_graph(import_graph(), modules))
    assert not found, f"package import circles: {found}"


def test_the_package_root_keeps_only_what_a_user_names():
    root_modules = sorted(path.name for path in PACKAGE_DIR.glob("*.py"))
    assert len(root_modules) <= MAX_ROOT_MODULES, root_modules


def test_leaf_modules_import_nothing_of_ours():
    graph = import_graph()
    assert {leaf: graph[leaf] for leaf in LEAF_MODULES} == {leaf: set() for leaf in LEAF_MODULES}


def test_reward_names_match_the_registry():
    """rewards/names.py lists the names without the reward code; the registry has one builder per name."""
    from deepgen_rl.rewards.names import EDIT_ONLY_REWARDS, REWARD_NAMES
    from deepgen_rl.rewards.registry import REWARD_BUILDERS

    assert tuple(REWARD_BUILDERS) == REWARD_NAMES
    assert set(EDIT_ONLY_REWARDS) <= set(REWARD_NAMES)


def test_the_checks_see_function_local_and_type_checking_imports(tmp_path):
    """A circle made only of a function-local import and a TYPE_CHECKING import is found, and an import of a
    package above is reported (the checks run on a throwaway package laid out like ours)."""
    package = tmp_path / ROOT
    for folder in ("core", "trainer"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "trainer" / "a.py").write_text("def f():\n    from deepgen_rl.trainer.b import g\n")
    (package / "trainer" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    (package / "core" / "c.py").write_text("import deepgen_rl.trainer.b\n")
    assert circles(import_graph(package)) == [["deepgen_rl.trainer.a", "deepgen_rl.trainer.b"]]
    assert layer_violations(package) == [
        "deepgen_rl.core.c imports deepgen_rl.trainer.b (core -> trainer is not in LAYERS)"]
