"""The package's shape: dependencies point one way between its folders, and modules and functions stay short."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "adaptive_attn"
# lower layers never import higher ones: data; building blocks; sparse ops; sparse layer; model; Lightning;
# entry points (the top-level modules and the analysis of finished runs)
LAYERS = ["data", "nn", "ops", "sparse", "model", "lit", "analysis"]
ENTRY = len(LAYERS)
KERNELS = {"ops/triton_token.py"}  # Triton kernels: long by nature


def layer_of(module: str) -> int:
    """adaptive_attn.<folder>... -> its layer; top-level modules are entry points."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else ENTRY


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adaptive_attn"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("adaptive_attn")}
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield path, rel, "adaptive_attn." + ".".join(rel.with_suffix("").parts)


def test_dependencies_point_one_way():
    upward = [
        f"{name} imports {imported}"
        for path, _, name in modules()
        for imported in imports_of(path)
        if layer_of(imported) > layer_of(name)
    ]
    assert not upward, upward


def test_modules_and_functions_are_short():
    too_long = []
    for path, rel, _ in modules():
        if rel.as_posix() in KERNELS:
            continue
        source = path.read_text()
        if len(source.splitlines()) > 300:
            too_long.append(f"{rel}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno >= 50:
                too_long.append(f"{rel}:{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
