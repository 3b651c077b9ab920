"""The project's layout rules (docs/architecture.md): scripts/ by role, each role importing only the
roles before it, no import cycle, no module over 500 lines, no edit of the import path."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Each role may import the roles before it (module level); models/ comes first of all.
ROLES = ("models", "scripts.build", "scripts.serving", "scripts.bench", "scripts.deploy", "scripts.drills",
         "scripts.docs")
MAX_LINES = 500
# The one module that edits sys.path: it stands in for a TorchServe worker, which runs with its
# extracted archive's folder on the import path (scripts/build/in_process.py's docstring).
WORKER_EMULATION = "scripts/build/in_process.py"


def python_files(*folders):
    for folder in folders:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for file in sorted(files):
                if file.endswith(".py"):
                    yield os.path.relpath(os.path.join(dirpath, file), ROOT)


def module_name(path: str) -> str:
    name = path[:-3].replace(os.sep, ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def module_imports(path: str, modules) -> set:
    """The project modules ``path`` imports at module level (function-level imports are lazy by
    intent: they are not part of the import graph)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m in modules}


def role_of(module: str) -> str:
    return next(role for role in ROLES if module == role or module.startswith(role + "."))


@pytest.fixture(scope="module")
def graph():
    paths = list(python_files("scripts", "models"))
    modules = {module_name(p): p for p in paths}
    return {name: module_imports(path, modules) - {name} for name, path in modules.items()}


def test_scripts_holds_python_only_in_its_role_packages():
    top = sorted(f for f in os.listdir(os.path.join(ROOT, "scripts")) if f.endswith(".py") and f != "__init__.py")
    assert not top, f"modules at the top of scripts/ (put each in its role's package): {top}"
    packages = sorted(d for d in os.listdir(os.path.join(ROOT, "scripts"))
                      if os.path.isfile(os.path.join(ROOT, "scripts", d, "__init__.py")))
    assert ["scripts." + p for p in packages] == sorted(ROLES[1:])


def test_each_role_imports_only_the_roles_before_it(graph):
    order = {role: i for i, role in enumerate(ROLES)}
    wrong = [f"{module} ({role_of(module)}) imports {target} ({role_of(target)})"
             for module, targets in sorted(graph.items()) for target in sorted(targets)
             if order[role_of(target)] > order[role_of(module)]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle(graph):
    cycles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_checks_above_would_see_a_cycle_and_a_layer_broken():
    """The graph helpers on a made-up graph, so that the two tests above cannot pass vacuously."""
    assert role_of("scripts.bench.tune") == "scripts.bench" and role_of("models.catalog") == "models"
    modules = {module_name(p): p for p in python_files("scripts", "models")}
    assert "models.catalog" in module_imports("scripts/build/build_archives.py", modules)
    assert "scripts.serving.ts_server" in module_imports("scripts/bench/served.py", modules)


def test_no_module_of_scripts_models_or_handlers_is_over_500_lines():
    long = []
    for path in python_files("scripts", "models", "handlers"):
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            count = sum(1 for _ in f)
        if count > MAX_LINES:
            long.append(f"{path}: {count} lines")
    assert not long, "\n".join(long)


def test_only_the_worker_emulation_edits_the_import_path():
    edit = re.compile(r"sys\.path\s*(\.(append|insert|extend|remove)\b|\[[^\]]*\]\s*=|\+=|=)")
    found = [f"{path}:{n}: {line.strip()}"
             for path in python_files("handlers", "scripts", "models", "tests") if path != WORKER_EMULATION
             for n, line in enumerate(open(os.path.join(ROOT, path), encoding="utf-8"), 1)
             if edit.search(line) and path != os.path.relpath(__file__, ROOT)]
    assert not found, "\n".join(found)
