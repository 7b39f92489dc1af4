"""Config: YAML files, --set overrides, validation, `fraglm config show`."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fraglm.config import (
    SECTIONS,
    Config,
    apply_overrides,
    from_dict,
    load_config,
    reference_markdown,
)
from fraglm.errors import FraglmError

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_no_file_means_defaults():
    assert load_config(None) == Config()
    assert load_config(None, []) == Config()


def test_configs_are_shipped():
    assert {"cpu.yaml", "p100.yaml", "tiny.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_survives_show(path):
    cfg = load_config(path)
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_an_empty_file_is_an_error_not_all_defaults(tmp_path, text):
    (tmp_path / "empty.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(FraglmError, match=r"empty\.yaml is empty; .* leave out --config"):
        load_config(tmp_path / "empty.yaml")


def test_empty_sections_mean_defaults(tmp_path):
    (tmp_path / "section.yaml").write_text("model:\ntrain:\n", encoding="utf-8")
    assert load_config(tmp_path / "section.yaml") == Config()


# overrides: values are YAML


@pytest.mark.parametrize(
    ("override", "attribute", "expected"),
    [
        ("train.max_steps=50", "train.max_steps", 50),
        ("train.lr=1e-3", "train.lr", 0.001),
        ("train.lr=3.0e-4", "train.lr", 0.0003),
        ("train.lr=2", "train.lr", 2.0),
        ("train.lr=.5", "train.lr", 0.5),
        ("model.dropout=0.25", "model.dropout", 0.25),
        ("model.norm_eps=1e-6", "model.norm_eps", 1e-6),
        ("train.compile=true", "train.compile", True),
        ("logging.progress=false", "logging.progress", False),
        ("logging.wandb=True", "logging.wandb", True),
        ("data.text_field=null", "data.text_field", None),
        ("data.text_field=text", "data.text_field", "text"),
        ("data.max_records=null", "data.max_records", None),
        ("data.max_records=~", "data.max_records", None),
        ("data.max_records=", "data.max_records", None),
        ("sample.seed=7", "sample.seed", 7),
        ("data.path=my corpus.jsonl", "data.path", "my corpus.jsonl"),
        ("data.path='2024'", "data.path", "2024"),
        ("data.path=a=b.jsonl", "data.path", "a=b.jsonl"),
        ("data.template='Q: {question} A: {answer}'", "data.template", "Q: {question} A: {answer}"),
        ("sample.stop=<|END|>", "sample.stop", "<|END|>"),
        ("model.attention=sdpa", "model.attention", "sdpa"),
        (" train.seed = 5", "train.seed", 5),
    ],
)
def test_override_values_are_typed_like_yaml(override, attribute, expected):
    cfg = load_config(None, [override])
    section, key = attribute.split(".")
    value = getattr(getattr(cfg, section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_overrides_apply_on_top_of_the_file_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\n  max_steps: 10\n", encoding="utf-8")
    cfg = load_config(path, ["train.max_steps=20", "train.max_steps=30", "model.n_layers=3"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.model.n_layers) == (0.01, 30, 3)
    assert cfg.train.batch_size == Config().train.batch_size


def test_overrides_do_not_modify_the_raw_config():
    raw = {"train": {"lr": 0.01}, "model": None}
    merged = apply_overrides(raw, ["train.lr=0.5", "model.n_layers=2"])
    assert raw == {"train": {"lr": 0.01}, "model": None}
    assert merged == {"train": {"lr": 0.5}, "model": {"n_layers": 2}}


def test_yaml_file_number_forms(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 0\nmodel:\n  rope_theta: 1e4\n")
    cfg = load_config(path)
    assert cfg.train.lr == 0.001 and cfg.model.rope_theta == 10000.0
    assert isinstance(cfg.train.weight_decay, float)


@settings(max_examples=50, deadline=None)
@given(lr=st.floats(min_value=1e-12, max_value=1e6, allow_nan=False))
def test_any_float_survives_override_and_show(lr):
    cfg = load_config(None, [f"train.lr={lr!r}"])
    assert cfg.train.lr == lr
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(exclude_characters="\x85"), min_size=1))
def test_any_string_survives_show(text):
    # U+0085 is left out: PyYAML folds it into a space in plain scalars (a PyYAML quirk).
    cfg = Config()
    cfg.data.path = text
    cfg.sample.stop = text
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


# validation


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["train.max_step=5"], ["unknown config key 'train.max_step'", "'train.max_steps'"]),
        (["model.nlayers=2"], ["did you mean 'model.n_layers'"]),
        (["trian.lr=1"], ["unknown config section 'trian'", "did you mean 'train'"]),
        (["model.zzzz=1"], ["unknown config key 'model.zzzz'", "valid keys: model.arch"]),
        (["train.max_steps=abc"], ["'train.max_steps' = 'abc'", "expected an integer"]),
        (["train.max_steps=1.5"], ["expected an integer"]),
        (["train.max_steps=true"], ["expected an integer"]),
        (["train.lr=fast"], ["'train.lr'", "expected a number"]),
        (["train.lr=[1]"], ["expected a number"]),
        (["logging.progress=1"], ["'logging.progress'", "expected true or false"]),
        (["data.path=123"], ["'data.path' = 123", "expected a string"]),
        (["data.path=null"], ["expected a string"]),
        (["data.max_records=many"], ["'data.max_records' = 'many'", "expected an integer"]),
        (["model.arch=gpt"], ["'model.arch' = 'gpt'", "one of 'modern', 'seed'"]),
        (["model.attention=flash"], ["one of 'fragment', 'sdpa', 'naive'"]),
        (["train.max_steps=0"], ["'train.max_steps' = 0", "must be >= 1"]),
        (["train.lr=0"], ["'train.lr' = 0.0", "must be > 0"]),
        (["train.lr=-1e-3"], ["must be > 0"]),
        (["data.val_fraction=1"], ["'data.val_fraction' = 1.0", "must be < 1"]),
        (["data.val_fraction=-0.1"], ["must be >= 0"]),
        (["sample.top_p=1.5"], ["'sample.top_p' = 1.5", "must be <= 1"]),
        (["tokenizer.vocab_size=259"], ["'tokenizer.vocab_size' = 259", "must be >= 260"]),
        (["data.max_records=0"], ["'data.max_records' = 0", "must be >= 1"]),
        (["model.n_heads=3"], ["'model.n_heads' = 3", "must divide model.d_model = 128"]),
        (["model.d_model=24", "model.n_heads=8"], ["head size", "even"]),
        (["model.n_kv_heads=3"], ["'model.n_kv_heads' = 3", "must divide model.n_heads"]),
        (["train.grad_accum=5"], ["'train.grad_accum' = 5", "must divide train.batch_size"]),
        (["data.template=<|Q|>{question}<|END|>"], ["'data.template'", "{answer}"]),
        (["data.template='{question}{answer}{context}'"], ["'data.template'", "placeholders"]),
        (["data.template='{question}{answer}{'"], ["'data.template'", "literal brace"]),
        (["train.lr"], ["override 'train.lr' must look like section.key=value"]),
        (["lr=1"], ["must look like section.key=value"]),
        (["train.lr=[1"], ["override 'train.lr=[1'", "not valid YAML"]),
        (["data.template={question}{answer}"], ["override 'data.template=", "not valid YAML"]),
    ],
)
def test_invalid_values_are_named(overrides, fragments):
    with pytest.raises(FraglmError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_seed_arch_allows_odd_head_size():
    cfg = load_config(None, ["model.arch=seed", "model.d_model=24", "model.n_heads=8"])
    assert cfg.model.d_model // cfg.model.n_heads == 3


def test_literal_braces_and_text_field_templates_are_fine():
    cfg = load_config(None, ["data.template='{{{question}}}->{answer}<|END|>'"])
    assert cfg.data.template.format(question="q", answer="a") == "{q}->a<|END|>"
    # the template is unused for plain-text corpora, so it is not checked there
    assert load_config(None, ["data.text_field=text", "data.template=x"]).data.template == "x"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("train:\n  lr: [1\n", ["is not valid YAML", "line 3"]),
        ('data:\n  path: "a\n', ["is not valid YAML", "line"]),
        ("data:\n\tpath: a\n", ["is not valid YAML", "line 2"]),
        ("- data\n- train\n", ["must be a mapping of sections"]),
        ("just a string\n", ["must be a mapping of sections"]),
        ("data: 5\n", ["config section 'data' must be a mapping"]),
        ("data: [path]\n", ["config section 'data' must be a mapping"]),
        ("data:\n  5: x\n", ["unknown config key 'data.5'", "valid keys"]),
        ("modle:\n  n_layers: 2\n", ["unknown config section 'modle'", "did you mean 'model'"]),
        ("train:\n  learning_rate: 0.1\n", ["unknown config key 'train.learning_rate'"]),
        ("train:\n  lr: '1e-3x'\n", ["'train.lr' = '1e-3x'", "expected a number"]),
        ("train:\n  batch_size: 32\n  grad_accum: 3\n", ["must divide train.batch_size = 32"]),
    ],
)
def test_bad_config_files_are_named(tmp_path, text, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(FraglmError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_bad_section_in_file_with_an_override(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: 5\n", encoding="utf-8")
    with pytest.raises(FraglmError, match="config section 'data' must be a mapping"):
        load_config(path, ["data.path=x.jsonl"])


def test_missing_and_non_utf8_config_files(tmp_path):
    with pytest.raises(FraglmError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(FraglmError, match="config file not found"):
        load_config(tmp_path)  # a directory
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("data:\n  path: caf\xe9.jsonl\n".encode("latin-1"))
    with pytest.raises(FraglmError, match="not UTF-8"):
        load_config(latin1)


# config show and reference


def test_config_show_prints_yaml_that_loads_back(run_cli, tmp_path):
    path = REPO_ROOT / "configs" / "tiny.yaml"
    overrides = ["train.lr=1e-3", "data.text_field=text", "logging.wandb=true", "sample.seed=3"]
    args = ["config", "show", "--config", path]
    for item in overrides:
        args += ["--set", item]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    expected = load_config(path, overrides)
    assert from_dict(yaml.safe_load(result.stdout)) == expected
    # and as a config file of its own
    saved = tmp_path / "resolved.yaml"
    saved.write_text(result.stdout, encoding="utf-8")
    assert load_config(saved) == expected
    assert set(yaml.safe_load(result.stdout)) == set(SECTIONS)


def test_config_show_defaults(run_cli):
    result = run_cli("config", "show")
    assert result.exit_code == 0
    assert from_dict(yaml.safe_load(result.stdout)) == Config()


def test_config_show_keeps_non_ascii_readable(run_cli):
    result = run_cli("config", "show", "-s", "data.path=données/糖尿病.jsonl")
    assert result.exit_code == 0
    assert "données/糖尿病.jsonl" in result.stdout


def test_config_show_rejects_bad_input(run_cli):
    run_cli("config", "show", "--set", "train.max_step=5").assert_user_error(
        "did you mean 'train.max_steps'"
    )


def test_reference_lists_every_key():
    text = reference_markdown()
    for section, cls in SECTIONS.items():
        assert f"### `{section}`" in text
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, f"{section}.{f.name}"


def test_every_key_has_help():
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f.name
