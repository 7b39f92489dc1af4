"""Print, one a line, the requirements of CI's floor run: each `name>=X` of pyproject.toml's
dependencies, of the gpu extra and of the test runners (pytest, hypothesis, ruff) as
`name==X`, so that the floors the project claims are the releases it runs its tests on."""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["project"]
extras = project["optional-dependencies"]
runners = [r for r in extras["dev"] if r.startswith(("pytest>=", "hypothesis>=", "ruff>="))]
for requirement in [*project["dependencies"], *extras["gpu"], *runners]:
    match = re.fullmatch(r"([\w.-]+)>=([\w.]+)\s*(;.*)?", requirement)
    if match is None:
        sys.exit(f"pyproject.toml: {requirement!r} names no floor (name>=X)")
    name, floor, marker = match.groups()
    print(f"{name}=={floor}{marker or ''}")
