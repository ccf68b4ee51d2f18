"""Model configs, one layer for every family: the shared config.json machinery (`base.py`), DeepSeek-V3's
`ModelConfig` and DeepSeek-V2's `DeepSeekV2Config` with their presets (`deepseek.py`) and the dense students'
`DenseConfig` (`dense.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import ConfigError, HFConfig, read_json_object
from .deepseek import (
    PRESETS,
    SUPPORTED_MODEL_TYPES,
    V2_PRESETS,
    DeepSeekV2Config,
    DeepSeekV32Config,
    ModelConfig,
    extended_context,
    preset,
    yarn_mscale,
)
from .dense import DENSE_ARCHITECTURES, DENSE_PRESETS, DenseConfig

FAMILIES: tuple[type[HFConfig], ...] = (ModelConfig, DeepSeekV2Config, DeepSeekV32Config, DenseConfig)


def config_from_dict(raw: dict[str, Any]) -> ModelConfig | DenseConfig:
    """The config of whichever family reads this `model_type`."""
    for family in FAMILIES:
        if raw.get("model_type") in family.MODEL_TYPES:
            return family.from_dict(raw)  # type: ignore[return-value]
    supported = dict.fromkeys(kind for family in FAMILIES for kind in family.MODEL_TYPES)  # once each, in order
    raise ConfigError(f"config field `model_type` = {raw.get('model_type')!r} is not supported; supported: "
                      f"{', '.join(supported)}")


def read_config_file(path: str | Path) -> ModelConfig | DenseConfig:
    """A config.json of any family."""
    return config_from_dict(read_json_object(path))


__all__ = [
    "DENSE_ARCHITECTURES", "DENSE_PRESETS", "FAMILIES", "PRESETS", "SUPPORTED_MODEL_TYPES", "V2_PRESETS",
    "ConfigError", "DeepSeekV2Config", "DeepSeekV32Config", "DenseConfig", "HFConfig", "ModelConfig",
    "config_from_dict", "extended_context", "preset", "read_config_file", "yarn_mscale",
]
