"""Reading a config: YAML and ``--set`` overrides checked against the section dataclasses
(types, bounds, consistency between keys), with one-line errors that name the key; and the
README's config reference, written from the same dataclasses."""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from fraglm.config.sections import (
    INT_LIMIT,
    MAX_CONFIG_BYTES,
    MAX_OVERRIDE_CHARS,
    MAX_YAML_DEPTH,
    MIN_TEMPERATURE,
    SECTIONS,
    Config,
)
from fraglm.errors import FraglmError, first_line, read_text_file


def _closest(name: str, options: list[str], prefix: str = "") -> str:
    """A hint naming the closest valid key, or listing them all when none is close."""
    match = difflib.get_close_matches(str(name), options, n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{prefix}{match[0]}'?"
    return "; valid keys: " + ", ".join(prefix + o for o in options)


def _describe_type(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_optional(tp):
        inner = _non_null(tp)
        return f"{_describe_type(inner)} or null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _non_null(tp: Any) -> Any:
    return next(a for a in typing.get_args(tp) if a is not type(None))


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    if _is_optional(tp):
        if value is None:
            return None
        tp = _non_null(tp)
    if tp is float and isinstance(value, str):
        value = _parse_float(value)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if (
        tp is float
        and number
        and not (abs(value) < INT_LIMIT if isinstance(value, int) else math.isfinite(value))
    ):
        raise FraglmError(f"config key '{key}' = {show(value)}: must be a finite number")
    if tp is int and isinstance(value, int) and not -INT_LIMIT < value < INT_LIMIT:
        raise FraglmError(f"config key '{key}' = {show(value)}: must fit in 64 bits")
    ok = (
        (typing.get_origin(tp) is Literal and value in typing.get_args(tp))
        or (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise FraglmError(f"config key '{key}' = {show(value)}: expected {_describe_type(tp)}")
    return float(value) if tp is float else value


_REPR = reprlib.Repr()  # bounded even for deep or huge values (YAML aliases)
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 80, 80, 40


def shorten(text: str, limit: int = 60) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(value: Any) -> str:
    """A value as it appears in a message: a bounded repr, on one line, shortened."""
    return shorten(_REPR.repr(value))


def _parse_float(text: str) -> float | str:
    """PyYAML reads ``1e-3`` (no dot) as a string; accept it as the number users meant."""
    try:
        return float(text)
    except ValueError:
        return text


def _check_bounds(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if value is None:
        return
    checks = {
        "ge": (lambda b: value >= b, ">="),
        "gt": (lambda b: value > b, ">"),
        "le": (lambda b: value <= b, "<="),
        "lt": (lambda b: value < b, "<"),
    }
    for name, (test, op) in checks.items():
        if name in meta and not test(meta[name]):
            raise FraglmError(f"config key '{key}' = {show(value)}: must be {op} {meta[name]}")


def _build_section(section: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{section}.{shorten(str(name))}"
        if name not in fields:
            raise FraglmError(
                f"unknown config key '{key}'" + _closest(name, list(fields), f"{section}.")
            )
        kwargs[name] = _coerce(key, value, hints[name])
        _check_bounds(key, kwargs[name], fields[name].metadata)
    return cls(**kwargs)


def _check_consistency(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    if m.d_model % m.n_heads:
        raise FraglmError(
            f"config key 'model.n_heads' = {m.n_heads}: must divide model.d_model = {m.d_model}"
        )
    if m.head_dim % 2 and m.arch == "modern":
        raise FraglmError(
            f"config key 'model.n_heads' = {m.n_heads}: head size d_model/n_heads must be even "
            "for RoPE"
        )
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        raise FraglmError(
            f"config key 'model.n_kv_heads' = {m.n_kv_heads}: must divide model.n_heads = "
            f"{m.n_heads}"
        )
    if 0 < cfg.sample.temperature < MIN_TEMPERATURE:
        raise FraglmError(
            f"config key 'sample.temperature' = {cfg.sample.temperature!r}: must be 0 (greedy) "
            f"or at least {MIN_TEMPERATURE}"
        )
    if t.batch_size % t.grad_accum:
        raise FraglmError(
            f"config key 'train.grad_accum' = {t.grad_accum}: must divide train.batch_size = "
            f"{t.batch_size}"
        )
    if cfg.data.text_field is None:
        for placeholder in ("{question}", "{answer}"):
            if placeholder not in cfg.data.template:
                raise FraglmError(
                    f"config key 'data.template' = {show(cfg.data.template)}: must contain "
                    f"{placeholder}"
                )
        try:
            cfg.data.template.format(question="", answer="")
        except (KeyError, IndexError, ValueError, AttributeError):
            raise FraglmError(
                f"config key 'data.template' = {show(cfg.data.template)}: the only placeholders "
                "are {question} and {answer} (write {{ or }} for a literal brace)"
            ) from None


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain data (as read from YAML)."""
    if not isinstance(raw, dict):
        raise FraglmError("config must be a mapping of sections (data, model, train, ...)")
    sections = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise FraglmError(
                f"unknown config section {show(section)}" + _closest(section, list(SECTIONS))
            )
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise FraglmError(f"config section '{section}' must be a mapping of keys to values")
        sections[section] = _build_section(section, values)
    cfg = Config(**sections)
    _check_consistency(cfg)
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to raw config data."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        if len(item) > MAX_OVERRIDE_CHARS:
            raise FraglmError(
                f"override {show(item)} is longer than {MAX_OVERRIDE_CHARS:,} characters"
            )
        dotted, sep, text = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot or not key:
            raise FraglmError(f"override {show(item)} must look like section.key=value")
        value = parse_yaml(text, f"override {show(item)}") if text.strip() else None
        values = merged.get(section)
        if values is None:
            values = merged[section] = {}
        if not isinstance(values, dict):
            raise FraglmError(f"config section '{section}' must be a mapping of keys to values")
        values[key] = value
    return merged


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message spans several lines; keep what is wrong and where."""
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return shorten(problem, 120) + where


def parse_yaml(text: str, what: str) -> Any:
    """YAML as plain data, within limits: nesting deeper than ``MAX_YAML_DEPTH``, a type tag
    its value does not fit (``!!float abc``) and invalid YAML are one-line errors."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # iterative: no recursion
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise FraglmError(f"{what} nests deeper than {MAX_YAML_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FraglmError(f"{what} is not valid YAML: {_yaml_problem(exc)}") from None
    except (
        ValueError,
        TypeError,
        OverflowError,
        RecursionError,
        IndexError,
        KeyError,
        AttributeError,
    ) as exc:
        # PyYAML's constructors raise these for a tagged value they cannot build
        # (``!!float abc``; with nothing after the tag ``!!int`` is an IndexError, ``!!bool``
        # a KeyError, ``!!timestamp`` an AttributeError)
        raise FraglmError(
            f"{what}: a value does not fit its type tag ({shorten(first_line(exc), 80)})"
        ) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FraglmError(f"config file not found: {path}")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise FraglmError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB")
        raw = parse_yaml(read_text_file(path, "config file"), f"config file {path}")
        if raw is None:
            raise FraglmError(
                f"config file {path} is empty; give it at least one section (data, model, "
                "train, ...), or leave out --config for the built-in defaults"
            )
        if not isinstance(raw, dict):
            raise FraglmError(f"config file {path} must be a mapping of sections")
    return from_dict(apply_overrides(raw, overrides or []))


def reference_markdown() -> str:
    """The config reference for the README: every section, key, type, default and help."""
    lines = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        lines += [f"### `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = yaml.safe_dump(f.default, default_flow_style=True).strip()
            default = default.removesuffix("...").strip()
            cells = [
                f"`{f.name}`",
                _describe_type(hints[f.name]),
                f"`{default}`",
                f.metadata["help"],
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)
