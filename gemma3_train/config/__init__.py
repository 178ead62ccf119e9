"""The config: every field declared once with its default and help text (fields.py), config
files and dicts turned into a frozen, validated Config (files.py), and the checks (validate.py).

The bottom of the package: it imports nothing else from gemma3_train (nor jax), so that
`from gemma3_train import config` stays light for the CLIs' --help and for config files.
"""

from gemma3_train.config.aliases import hint as field_hint
from gemma3_train.config.fields import (ATTENTION_IMPLS, CONTEXT_LAYOUTS, DPO_REFERENCE_FREE, DTYPES, GLOBAL_EVERY, LORA_BASE_DTYPES,
                                        LORA_TARGETS, MESH_AXES, MESH_AXIS_TABLE,
                                        MIXTURE_EXHAUSTED, MODEL_SHAPE_FIELDS, OBJECTIVES, PRESETS,
                                        REMAT_POLICIES, REMAT_UNITS, SCAN_UNITS, SCHEDULES,
                                        SOURCES, CheckpointConfig,
                                        Config, ConfigError, DataConfig, DistillConfig,
                                        DpoConfig, FieldDoc, LoggingConfig,
                                        LoraConfig, MeshConfig, ModelConfig, OptimConfig,
                                        TrainConfig, default_config_dict, field_docs,
                                        lora_dims, sections, use_chat_data)
from gemma3_train.config.files import (from_config_dict, from_dict, load_config_dict,
                                       load_config_file)
from gemma3_train.config.mixture import MixtureSource, parse_mixture, source_data
from gemma3_train.config.validate import require, validate

__all__ = [
    'ATTENTION_IMPLS',
    'CONTEXT_LAYOUTS',
    'CheckpointConfig',
    'Config',
    'ConfigError',
    'DPO_REFERENCE_FREE',
    'DTYPES',
    'DataConfig',
    'DistillConfig',
    'DpoConfig',
    'FieldDoc',
    'GLOBAL_EVERY',
    'LORA_BASE_DTYPES',
    'LORA_TARGETS',
    'LoggingConfig',
    'LoraConfig',
    'MESH_AXES',
    'MESH_AXIS_TABLE',
    'MIXTURE_EXHAUSTED',
    'MODEL_SHAPE_FIELDS',
    'OBJECTIVES',
    'MeshConfig',
    'MixtureSource',
    'ModelConfig',
    'OptimConfig',
    'PRESETS',
    'REMAT_POLICIES',
    'REMAT_UNITS',
    'SCAN_UNITS',
    'SCHEDULES',
    'SOURCES',
    'TrainConfig',
    'default_config_dict',
    'field_docs',
    'field_hint',
    'from_config_dict',
    'from_dict',
    'load_config_dict',
    'load_config_file',
    'lora_dims',
    'parse_mixture',
    'require',
    'sections',
    'source_data',
    'use_chat_data',
    'validate',
]
