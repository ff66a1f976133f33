"""The package's import graph, read with `ast` (no code runs): imports run one way, from
tools/ down to analysis/, and no module takes part in a cycle (docs/api.md: the layers)."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Lowest first: a module may import its own layer or lower ones, never a higher one.
LAYERS = (
  "analysis",
  "jax_pythia",  # errors.py and files.py: what every subpackage shares
  "jax_pythia.models",
  "jax_pythia.data",
  "jax_pythia.checkpoints",
  "jax_pythia.study",
  "jax_pythia.scale",
  "jax_pythia.toy",
  "jax_pythia.sweep",
  "tools",
)
# The package root's __init__ only configures XLA:CPU before jax starts.
ROOT_INIT = "jax_pythia"


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def layer_of(module: str) -> int:
  best = -1
  for index, layer in enumerate(LAYERS):
    if module == layer or module.startswith(layer + "."):
      if best < 0 or len(layer) > len(LAYERS[best]):
        best = index
  return best


def project_modules() -> dict[str, pathlib.Path]:
  found = {}
  for top in ("analysis", "jax_pythia", "tools"):
    for path in sorted((REPO / top).rglob("*.py")):
      found[module_name(path)] = path
  return found


def imports_of(path: pathlib.Path, module: str, known: set[str]) -> set[str]:
  """The project modules `path` imports, wherever the import statement stands."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
        base = base.rstrip(".")
      names = [f"{base}.{alias.name}" for alias in node.names] + [base]
    else:
      continue
    for name in names:
      while name and name not in known:
        name = name.rpartition(".")[0]
      if name and name != module:
        found.add(name)
  return found


def import_graph() -> dict[str, set[str]]:
  modules = project_modules()
  known = set(modules)
  return {m: imports_of(p, m, known) for m, p in modules.items()}


def test_every_module_belongs_to_a_layer():
  assert [m for m in project_modules() if layer_of(m) < 0] == []


def test_no_module_imports_a_higher_layer():
  upward = [
    f"{m} ({LAYERS[layer_of(m)]}) imports {d} ({LAYERS[layer_of(d)]})"
    for m, deps in import_graph().items()
    if m != ROOT_INIT
    for d in sorted(deps)
    if layer_of(d) > layer_of(m) and not m.startswith(d + ".")
  ]
  assert upward == []


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 1:
        return stack[stack.index(dep) :] + [dep]
      if dep not in state and (found := visit(dep)):
        return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_no_import_cycles():
  graph = import_graph()
  # A package's __init__ re-exporting its modules is not a cycle of the modules themselves.
  graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


@pytest.mark.parametrize(
  "graph, expected", [({"a": {"b"}, "b": {"a"}}, True), ({"a": {"b"}}, False)]
)
def test_the_cycle_finder_finds_cycles(graph, expected):
  assert (_cycle(graph) is not None) == expected
