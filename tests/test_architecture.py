"""The package's structure: imports inside fip_peft go one way (no runtime import cycle, imports under
`if TYPE_CHECKING:` aside), and no class grows past what one reading can hold."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fip_peft"
MAX_CLASS_LINES = 350
MAX_TUNER_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The fip_peft modules `path` imports at run time, at the top or inside functions (not for type checking)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:  # `from . import layer`
                    found.add(f"{target}.{alias.name}")
                elif target in modules:
                    found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = [p for p in PACKAGE.rglob("*.py") if "metrics" not in p.parts]
    modules = {module_name(p) for p in paths}
    return {module_name(p): runtime_imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return [*stack[stack.index(child) :], child]
            if child not in state and (cycle := walk(child)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_the_import_graph_sees_the_imports_it_must_see():
    graph = import_graph()
    assert "fip_peft.method.config" in graph["fip_peft.method.model"]
    assert "fip_peft.method.layer" in graph["fip_peft.method.metric"]  # `from . import layer as fip_layers`
    assert "fip_peft.method.model" not in graph["fip_peft.method.checks"]  # only under TYPE_CHECKING


def test_no_module_of_fip_peft_imports_itself_back_at_run_time():
    graph = {name: deps - {"fip_peft"} for name, deps in import_graph().items() if name != "fip_peft"}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


# The layers of the package, lowest first (docs/architecture.md): a module imports its own layer and the ones below.
LAYERS = (
    "fip_peft.choices",
    "fip_peft.math",
    "fip_peft.method",
    "fip_peft.optimizers",
    "fip_peft.integrations",
    "fip_peft.apps",
)


def layer_of(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + "."))


def test_every_module_sits_in_one_layer():
    modules = set(import_graph()) - {"fip_peft", "fip_peft._moved", "fip_peft.__main__"}
    assert all(any(m == layer or m.startswith(layer + ".") for layer in LAYERS) for m in modules), sorted(modules)


def test_imports_go_down_the_layers_never_up():
    upward = {
        (module, imported)
        for module, imports in import_graph().items()
        if module not in ("fip_peft", "fip_peft._moved", "fip_peft.__main__")
        for imported in imports - {"fip_peft"}
        if layer_of(imported) > layer_of(module)
    }
    assert not upward, f"imports that go up a layer: {sorted(upward)}"


def test_the_math_knows_no_model_class_and_no_peft():
    for path in (PACKAGE / "math").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {m for m in imported if m.split(".")[0] in ("peft", "transformers", "accelerate")}, path.name


def test_no_class_is_longer_than_one_reading():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long[f"{module_name(path)}.{node.name}"] = node.end_lineno - node.lineno + 1
    assert not long, f"classes over {MAX_CLASS_LINES} lines: {long}"


def test_the_tuner_keeps_the_peft_glue_and_delegates_the_rest():
    tree = ast.parse((PACKAGE / "method" / "model.py").read_text())
    (tuner,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "FIPModel"]
    assert tuner.end_lineno - tuner.lineno + 1 <= MAX_TUNER_LINES
