"""What every model config shares: config.json reading and writing in transformers' layout
(`configuration_utils.py`'s PretrainedConfig: flat JSON, `architectures`, `model_type`), unknown keys kept for a
faithful round trip, and validation that names the field and the rule it breaks."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

Config = TypeVar("Config", bound="HFConfig")

# Keys of transformers' PretrainedConfig that say nothing about the architecture; dropped on read.
COMMON_IGNORED_KEYS = frozenset({
    "architectures", "auto_map", "transformers_version", "_name_or_path", "output_hidden_states",
    "output_attentions", "return_dict", "use_return_dict", "torchscript", "dtype", "torch_dtype",
    "_attn_implementation_autoset", "model_type", "use_cache",
})


class ConfigError(ValueError):
    """A config field breaks a rule; the message names the field and the rule."""


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold one object; ConfigError naming the file, line and column otherwise."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


class HFConfig:
    """Base of the families' config dataclasses. A family sets `MODEL_TYPES` (the `model_type` values it
    reads), `IGNORED_KEYS`, `OMITTED_WHEN_NONE` (fields left out of config.json when unset), and implements
    `architecture`, `validate` and, where config.json has several spellings of a field, `read_special`."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()
    IGNORED_KEYS: ClassVar[frozenset[str]] = COMMON_IGNORED_KEYS
    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ()
    extra: dict[str, Any]  # keys this family does not model, kept for a faithful round trip

    # ---- validation ------------------------------------------------------------------------------
    def validate(self: Config) -> Config:
        raise NotImplementedError

    def need(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"config field `{name}` = {getattr(self, name, self.extra.get(name))!r}: {rule}")

    def need_positive_ints(self, names: Iterable[str]) -> None:
        for name in names:
            value = getattr(self, name)
            self.need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                      "must be a positive integer")

    def need_ints(self, names: Iterable[str]) -> None:
        for name in names:
            value = getattr(self, name)
            self.need(isinstance(value, int) and not isinstance(value, bool), name, "must be an integer")

    def need_bools(self, names: Iterable[str]) -> None:
        for name in names:
            self.need(isinstance(getattr(self, name), bool), name, "must be true or false")

    def need_numbers(self, names: Iterable[str]) -> None:
        for name in names:
            value = getattr(self, name)
            self.need(isinstance(value, (int, float)) and not isinstance(value, bool), name, "must be a number")

    # ---- JSON ------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        """The transformers class that loads this config (`architectures[0]` in config.json)."""
        raise NotImplementedError

    @classmethod
    def read_special(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Fields that config.json spells in more than one way, read into their canonical form; the keys
        returned (and those in `raw` that they were read from) are not copied again."""
        return {}

    @classmethod
    def from_dict(cls: type[Config], raw: dict[str, Any]) -> Config:
        """Build from a config.json dict, then validate."""
        model_type = raw.get("model_type")
        if model_type not in cls.MODEL_TYPES:
            raise ConfigError(f"config field `model_type` = {model_type!r} is not supported; supported: "
                              f"{', '.join(cls.MODEL_TYPES)}")
        raw = dict(raw)
        kwargs = cls.read_special(raw)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}  # type: ignore[arg-type]
        extra: dict[str, Any] = {}
        for key, value in raw.items():
            if key in kwargs:
                continue
            if key in known:
                kwargs[key] = value
            elif key not in cls.IGNORED_KEYS:
                extra[key] = value
        return cls(**kwargs, extra=extra).validate()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.MODEL_TYPES[0]}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name != "extra" and not (value is None and f.name in self.OMITTED_WHEN_NONE):
                out[f.name] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_json_file(cls: type[Config], path: str | Path) -> Config:
        return cls.from_dict(read_json_object(path))

    def to_json_file(self, path: str | Path, dtype: str | None = None) -> None:
        data = self.to_dict()
        if dtype is not None:
            data["torch_dtype"] = dtype
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def replace(self: Config, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes).validate()  # type: ignore[type-var]
