"""Print, one a line, the requirements of CI's floor run: each `name>=X` of pyproject.toml's
dependencies and of every extra as `name==X`, so that the floors the project claims are the
releases it runs its tests on."""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["project"]
extras = [r for group in project["optional-dependencies"].values() for r in group]
for requirement in [*project["dependencies"], *extras]:
    if requirement.startswith("fraglm["):  # dev's own extras, listed here already
        continue
    match = re.fullmatch(r"([\w.-]+)>=([\w.]+)\s*(;.*)?", requirement)
    if match is None:
        sys.exit(f"pyproject.toml: {requirement!r} names no floor (name>=X)")
    name, floor, marker = match.groups()
    print(f"{name}=={floor}{marker or ''}")
