"""The package's shape (docs/architecture.md): imports flow one way between the folders, with no
cycle even through imports inside functions, and no module over 500 lines."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'gemma3_train'

# Each part and the parts it may import (besides itself). infra and config import nothing else.
ALLOWED = {
    'config': set(),
    'infra': set(),
    'sharding': {'config'},
    'models': {'config', 'sharding'},
    'data': {'config', 'sharding', 'infra'},
    'convert': {'config', 'sharding', 'models', 'data', 'infra'},
    'inference': {'config', 'sharding', 'models', 'data', 'convert', 'infra'},
    'training': {'config', 'sharding', 'models', 'data', 'convert', 'inference', 'infra'},
    'planning': {'config', 'sharding', 'models', 'data', 'convert', 'inference', 'training',
                 'infra'},
    'cli': {'config', 'sharding', 'models', 'data', 'convert', 'inference', 'training',
            'planning', 'infra'},
}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob('*.py'):
    if 'assets' in path.parts:
      continue
    parts = path.relative_to(ROOT).with_suffix('').parts
    name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    out[name] = path
  return out


def _imports(name: str, path: pathlib.Path, names: set[str]) -> set[str]:
  """Every module of ours this one imports, at any depth of its code."""
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.rsplit('.', node.level - 1)[0] if node.level > 1 else package
        base = f'{anchor}.{base}' if base else anchor
      targets = [f'{base}.{a.name}' for a in node.names] + [base]
    else:
      continue
    for target in targets:
      while target and target not in names:
        target = target.rpartition('.')[0]
      if target and target != name and not target.startswith(name + '.'):
        found.add(target)
  return found


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _part(name: str) -> str | None:
  parts = name.split('.')
  return parts[1] if len(parts) > 1 else None


def test_imports_flow_one_way_between_the_parts():
  wrong = []
  for name, targets in _graph().items():
    part = _part(name)
    if part not in ALLOWED:  # the package root (gemma3_train.load) may import anything
      continue
    for target in targets:
      other = _part(target)
      if other is not None and other != part and other not in ALLOWED[part]:
        wrong.append(f'{name} -> {target}')
  assert not wrong, wrong


def test_no_import_cycles():
  """No strongly connected component of more than one module (Tarjan's, iteratively)."""
  graph = _graph()
  index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]
  for root in graph:
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter[0]
    counter[0] += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is None:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
          component = set()
          while True:
            top = stack.pop()
            on_stack.discard(top)
            component.add(top)
            if top == node:
              break
          if len(component) > 1:
            cycles.append(sorted(component))
      elif child not in index:
        index[child] = low[child] = counter[0]
        counter[0] += 1
        stack.append(child)
        on_stack.add(child)
        work.append((child, iter(sorted(graph[child]))))
      elif child in on_stack:
        low[node] = min(low[node], index[child])
  assert not cycles, cycles


def test_no_module_over_500_lines():
  long = {str(p.relative_to(ROOT)): n for p in _modules().values()
          if (n := len(p.read_text().splitlines())) > 500}
  assert not long, long


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
  """The check itself: a package with a -> b -> a through a function-level import fails it."""
  pkg = tmp_path / 'gemma3_train'
  (pkg / 'models').mkdir(parents=True)
  (pkg / '__init__.py').write_text('')
  (pkg / 'models' / '__init__.py').write_text('')
  (pkg / 'models' / 'a.py').write_text('from gemma3_train.models import b\n')
  (pkg / 'models' / 'b.py').write_text('def f():\n  from gemma3_train.models import a\n')
  monkeypatch.setitem(globals(), 'ROOT', tmp_path)
  monkeypatch.setitem(globals(), 'PACKAGE', pkg)
  graph = _graph()
  # Importing a module runs its package's __init__ too: an edge to the package.
  assert graph['gemma3_train.models.a'] == {'gemma3_train.models', 'gemma3_train.models.b'}
  assert graph['gemma3_train.models.b'] == {'gemma3_train.models', 'gemma3_train.models.a'}
  try:
    test_no_import_cycles()
  except AssertionError as e:
    assert 'gemma3_train.models.a' in str(e)
  else:
    raise AssertionError('the cycle a <-> b was not found')
