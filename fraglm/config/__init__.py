"""Run configuration: the section dataclasses (:mod:`fraglm.config.sections`) and reading
them from YAML and ``--set`` overrides (:mod:`fraglm.config.parsing`)."""

from fraglm.config.parsing import (
    apply_overrides,
    from_dict,
    load_config,
    parse_yaml,
    reference_markdown,
    show,
)
from fraglm.config.sections import (
    ANSWER,
    END,
    MAX_YAML_DEPTH,
    PAD,
    QUESTION,
    SECTIONS,
    SPECIAL_TOKENS,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    SampleConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "ANSWER",
    "END",
    "MAX_YAML_DEPTH",
    "PAD",
    "QUESTION",
    "SECTIONS",
    "SPECIAL_TOKENS",
    "Config",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "SampleConfig",
    "TokenizerConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "parse_yaml",
    "reference_markdown",
    "show",
]
