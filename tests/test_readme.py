"""The README's promises: its config reference matches the dataclasses, its configs exist."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sync_module():
    spec = importlib.util.spec_from_file_location("sync", ROOT / "scripts/sync_readme_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_matches_dataclasses():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert _sync_module().with_reference(text) == text, (
        "README config reference is stale: run python scripts/sync_readme_config.py"
    )


def test_configs_named_in_readme_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in set(re.findall(r"configs/[\w.-]+\.yaml", text)):
        assert (ROOT / name).is_file(), name


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci/run").read_text(encoding="utf-8")
    assert "\npytest\n" in readme
    assert "\npytest\n" in ci
    assert "torch==2.13.0" in ci
