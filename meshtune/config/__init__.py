"""The core of the run configuration: the generic loader and the core sections. Imports nothing else of
meshtune, and no torch: the launcher and `--help` stay instant.

The whole run's schema (these sections plus every recipe's own section) and `load_config` are in
meshtune/schema.py; each recipe declares its section in its own package under meshtune/recipes/.
"""

from meshtune.config.loader import (
    ConfigError,
    apply_overrides,
    build,
    bundled_configs,
    bundled_configs_dir,
    dump_yaml,
    field_docs,
    help_text,
    read_yaml,
    resolve_config_path,
    to_dict,
)
from meshtune.config.sections import (
    CheckpointConfig,
    DataConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    check_core,
)

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "MetricsConfig", "ModelConfig", "OptimConfig",
           "ParallelConfig", "TrainConfig", "apply_overrides", "build", "bundled_configs", "bundled_configs_dir",
           "check_core", "dump_yaml", "field_docs", "help_text", "read_yaml", "resolve_config_path", "to_dict"]
