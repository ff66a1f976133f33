"""Every `docs/<name>.md` cited in the code, tests, tools and README exists in the repository."""

from __future__ import annotations

import math
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
CITED = re.compile(r"docs/[\w.-]+\.md")
SEARCHED = ("README.md", "jax_pythia", "analysis", "tools", "tests", "benchmarks", "docs")


def _files():
  for name in SEARCHED:
    path = ROOT / name
    if path.is_file():
      yield path
    elif path.is_dir():
      yield from (p for p in sorted(path.rglob("*")) if p.suffix in (".py", ".md") and p.is_file())


def _citations() -> dict[str, list[str]]:
  cited: dict[str, list[str]] = {}
  for path in _files():
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      for doc in CITED.findall(line):
        cited.setdefault(doc, []).append(f"{path.relative_to(ROOT)}:{number}")
  return cited


def test_cited_docs_exist():
  cited = _citations()
  # The method and the suite are cited across the code; if this finds none, the pattern broke.
  assert {"docs/method.md", "docs/pythia.md"} <= set(cited)
  missing = {doc: where[:3] for doc, where in cited.items() if not (ROOT / doc).is_file()}
  assert not missing, f"cited but not in the repository: {missing}"


def test_no_citation_of_docs_outside_the_repository():
  """The study's spec lives outside the repository; the code cites the repo's own docs."""
  stale = [
    where
    for where in (
      f"{path.relative_to(ROOT)}:{n}"
      for path in _files()
      for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
      if re.search(r"(?<![\w/])(METHOD|PYTHIA)\.md", line)
    )
  ]
  assert not stale, f"cite docs/method.md or docs/pythia.md instead: {stale[:5]}"


def test_the_api_example_runs(capsys):
  """docs/api.md's example, as a notebook user would paste it."""
  text = (ROOT / "docs" / "api.md").read_text()
  (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
  exec(compile(code, "docs/api.md", "exec"), {})
  loss, cka = re.search(
    r"loss ([\d.]+), CKA\(layer 0, layer 1\) ([\d.-]+)", capsys.readouterr().out
  ).groups()
  # A random 64-token model's loss is near ln 64; CKA lies in [0, 1].
  assert abs(float(loss) - math.log(64)) < 0.5 and 0 <= float(cka) <= 1
