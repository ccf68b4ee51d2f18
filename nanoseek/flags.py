"""Command-line flags generated from settings dataclasses, and `--config run.toml` files read into them.

A stage's settings are a dataclass with a `validate()` that names the flag it checks; `settings_field`
documents a field, `add_flags` makes one flag per field (`max_steps` -> `--max-steps`, booleans as
`--x / --no-x`), and `settings_from` builds the validated dataclass from parsed flags. A field a stage fixes
is not a flag of that stage: passing it is refused with the reason, never accepted and ignored.

A run file is TOML (stdlib `tomllib`): top-level keys are flags of the command that reads it (`max-steps = 40`
or `max_steps = 40`); a table named after a command (`[grpo]`) holds keys for that command only, so one file
can describe a whole pipeline. Flags on the command line override the file (a repeatable one replaces the file's
list; one of mutually exclusive flags drops the file's choice among them).
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

Settings = TypeVar("Settings")
CONFIG_FLAG = "--config"


class RunFileError(ValueError):
    """A run file cannot be read or names a setting the command does not have; the message says which."""


def settings_field(default: Any, help: str = "", *, choices: Sequence[str] | None = None, kind: type | None = None,
                   repeat: bool = False) -> Any:
    """A settings dataclass field with its flag's help. `kind` is the value type when the default is None;
    `repeat` makes a list field a repeatable flag."""
    metadata = {"help": help, "choices": choices, "kind": kind, "repeat": repeat}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Refused(argparse.Action):
    """A flag this command does not take, refused with the reason instead of argparse's bare 'unrecognized'."""

    def __init__(self, option_strings, dest, reason: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.reason}")


def add_flags(parser: argparse.ArgumentParser, cls: type, fixed: Mapping[str, tuple[Any, str]] | None = None,
              helps: Mapping[str, str] | None = None, **defaults: Any) -> None:
    """One flag per field of the dataclass `cls`, with this command's `defaults` (and help texts, `helps`);
    `fixed` maps fields the command sets itself to (value, why), whose flags are refused with that reason."""
    fixed, helps = fixed or {}, helps or {}
    for f in dataclasses.fields(cls):
        if f.name in fixed:
            parser.add_argument(_flag(f.name), dest=f"refused_{f.name}", action=_Refused, reason=fixed[f.name][1])
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        meta = f.metadata
        help_text = helps.get(f.name, meta.get("help") or "")
        if isinstance(default, bool):  # argparse adds the default to this action's help itself
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        if default not in (None, [], ""):
            help_text += f" (default: {' '.join(map(str, default)) if isinstance(default, tuple) else default})"
        if meta.get("repeat"):
            parser.add_argument(_flag(f.name), action="append", default=list(default), help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(_flag(f.name), nargs=len(default), type=type(default[0]), default=default,
                                help=help_text)
        else:
            kind = meta.get("kind") or type(default)
            parser.add_argument(_flag(f.name), type=kind, default=default, choices=meta.get("choices"), help=help_text)


def settings_from(cls: type[Settings], args: argparse.Namespace,
                  fixed: Mapping[str, tuple[Any, str]] | None = None) -> Settings:
    """The validated dataclass the flags of `add_flags(parser, cls, fixed)` describe."""
    fixed = fixed or {}
    values = {f.name: fixed[f.name][0] if f.name in fixed else getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**values).validate()  # type: ignore[attr-defined]


DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHT_FORMATS = ("int8", "int4")  # weight-only quantisation (`model.quantized`)
DEFAULT_GROUP_SIZE = 64  # inputs per int4 scale and zero


def add_weight_flags(parser: argparse.ArgumentParser) -> None:
    """--dtype, --quantize, --compile and --index-cache-dtype of the commands that run a model (the engine's
    `LLM(dtype=..., quantize=..., compile=..., index_cache_dtype=...)`)."""
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights and compute: auto is bfloat16 on "
                        "CUDA, float32 on CPU (where bfloat16 matmuls are far slower)")
    parser.add_argument("--quantize", choices=WEIGHT_FORMATS, help="weight-only int8 (per channel) or int4 "
                        f"(groups of {DEFAULT_GROUP_SIZE}) matrices on PyTorch CPU kernels; the rest stays in --dtype")
    parser.add_argument("--compile", action="store_true", help="compile the decode steps with torch.compile (CPU, "
                        "float or int8 weights): faster decoding after a warm-up of tens of seconds the first time")
    parser.add_argument("--index-cache-dtype", choices=("int8",), help="a DeepSeek-V3.2 model's indexer keys in "
                        "int8 (one scale per key, int8 dot products), as V3.2 keeps them in FP8")


# ---- run files -------------------------------------------------------------------------------------
def _config_path(argv: Sequence[str]) -> str | None:
    """The --config file named in argv (the parsers take no abbreviations, so this is its only spelling)."""
    paths = []
    for i, token in enumerate(argv):
        if token == CONFIG_FLAG:
            if i + 1 >= len(argv):
                raise RunFileError(f"{CONFIG_FLAG}: expected a TOML file")
            paths.append(argv[i + 1])
        elif token.startswith(CONFIG_FLAG + "="):
            paths.append(token.split("=", 1)[1])
    if len(paths) > 1:
        raise RunFileError(f"{CONFIG_FLAG} given {len(paths)} times ({', '.join(paths)}): one run file at a time")
    return paths[0] if paths else None


def read_run_file(path: str | Path, command: str, commands: Sequence[str]) -> dict[str, Any]:
    """The settings a run file gives `command`: its top-level keys, then its `[command]` table."""
    path = Path(path)
    if path.suffix == ".json":
        raise RunFileError(f"{CONFIG_FLAG} {path}: a run file is TOML; a model's config.json is --model-config")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RunFileError(f"{CONFIG_FLAG} {path}: cannot read it ({exc.strerror})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RunFileError(f"{CONFIG_FLAG} {path}: not valid TOML ({exc})") from exc
    settings = {key: value for key, value in data.items() if not isinstance(value, dict)}
    for table, values in data.items():
        if isinstance(values, dict) and table not in commands:
            raise RunFileError(f"{path}: table [{table}] is not a command; commands: {', '.join(commands)}")
    settings.update(data.get(command, {}))
    return settings


def _value_tokens(action: argparse.Action, key: str, value: Any, path: Path) -> list[str]:
    """`value` as the command-line tokens that set it, checked as argparse would check them."""
    def bad(rule: str) -> RunFileError:
        return RunFileError(f"{path}: `{key}` = {value!r}: {rule}")

    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        if not isinstance(value, bool):
            raise bad("must be true or false")
        if isinstance(action, argparse.BooleanOptionalAction):  # `no-x = true` is `x = false`
            wanted = value != (_flag(key) == action.option_strings[1])
            return [action.option_strings[0] if wanted else action.option_strings[1]]
        return [action.option_strings[0]] if value else []
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction) or isinstance(action.nargs, int)
    items = value if isinstance(value, list) else [value]
    if isinstance(value, (list, dict)) and not many or not items and many:
        raise bad("must be a single value" if not many else "must not be empty")
    for item in items:
        if isinstance(item, (dict, list, bool)) and action.type is not bool:
            raise bad("must be a number or a string")
        try:
            converted = action.type(str(item)) if action.type else str(item)
        except (TypeError, ValueError) as exc:
            raise bad(f"not a valid {getattr(action.type, '__name__', 'value')}") from exc
        if action.choices is not None and converted not in action.choices:
            raise bad(f"must be one of {', '.join(map(str, action.choices))}")
    flag = action.option_strings[0]
    if isinstance(action, argparse._AppendAction):
        return [f"{flag}={item}" for item in items]
    if action.nargs is None:  # one value, `=`-joined so that a value starting with "-" stays a value
        return [f"{flag}={items[0]}"]
    return [flag, *map(str, items)]


def _given_on_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[argparse.Action]:
    """The actions the command line sets itself, and the others of their mutually exclusive groups: the file's
    value for any of them gives way (a flag overrides the file, a repeated flag replaces the file's list)."""
    named = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    given = {action for option, action in parser._option_string_actions.items() if option in named}
    for group in parser._mutually_exclusive_groups:
        if given & set(group._group_actions):
            given |= set(group._group_actions)
    return given


def with_run_file(argv: Sequence[str], command: str, parser: argparse.ArgumentParser,
                  commands: Sequence[str]) -> list[str]:
    """argv with the settings of its `--config` run file put before the command's own flags (which then win);
    argv unchanged without one."""
    path = _config_path(argv)
    if path is None:
        return list(argv)
    tokens: list[str] = []
    given = _given_on_command_line(parser, argv)
    for key, value in read_run_file(path, command, commands).items():
        action = parser._option_string_actions.get(_flag(key))  # argparse's table of the command's flags
        if action is None or isinstance(action, _Refused) or _flag(key) == CONFIG_FLAG:
            reason = f": {action.reason}" if isinstance(action, _Refused) else ""
            raise RunFileError(f"{path}: `{key}` is not a setting of `nanoseek {command}`{reason}")
        tokens += [] if action in given else _value_tokens(action, key, value, Path(path))
    position = list(argv).index(command) + 1
    return [*argv[:position], *tokens, *argv[position:]]
