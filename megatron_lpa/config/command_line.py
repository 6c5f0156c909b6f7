"""Command-line flags and YAML files -> one validated ``TrainingConfig``.

Every setting's flag is its field name with dashes; ``--help`` lists them by section. A YAML file
given with ``--config`` sets the same settings (flat keys, with dashes or underscores); flags on
the command line override it. Everything goes through argparse, so a value in the file is
type-checked like a flag and an error names the file and line.
"""

import argparse
import dataclasses
import difflib
import os
import sys
import typing
from pathlib import Path
from typing import Optional

import yaml

from megatron_lpa.config.training_config import TrainingConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _settings() -> dict:
    """``{name: field}`` of every setting that is a flag, in section order."""
    return {
        f.name: f
        for section in dataclasses.fields(TrainingConfig)
        for f in dataclasses.fields(section.type)
        if not f.metadata.get("derived")
    }


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" only to help that does not already say what the default is."""

    def _get_help_string(self, action):
        if "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain a GPT (dense or LPA) on megatron-core.",
        formatter_class=_DefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with any of these settings; flags override it.")
    for section in dataclasses.fields(TrainingConfig):
        doc = (section.type.__doc__ or "").strip()
        generated = doc.startswith(section.type.__name__ + "(")  # dataclass's default docstring
        group = parser.add_argument_group(section.name, None if generated else doc)
        for f in dataclasses.fields(section.type):
            if f.metadata.get("derived"):
                continue
            kind = _base_type(f.type)
            if kind is bool:
                group.add_argument(
                    _flag(f.name), dest=f.name, action="store_true", help=f.metadata["help"]
                )
            elif kind is list:
                group.add_argument(_flag(f.name), dest=f.name, nargs="+", help=f.metadata["help"])
            else:
                group.add_argument(
                    _flag(f.name),
                    dest=f.name,
                    type=kind,
                    choices=f.metadata["choices"],
                    help=f.metadata["help"],
                )
            parser.set_defaults(**{f.name: f.default})
    return parser


def _yaml_flags(path: str) -> list:
    """The YAML file's settings as command-line flags."""
    try:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
    except FileNotFoundError:
        raise SystemExit(f"--config {path}: no such file.") from None
    except yaml.YAMLError as error:
        raise SystemExit(f"--config {path}: not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise SystemExit(
            f"--config {path}: expected a mapping of settings, got {type(loaded).__name__}."
        )
    root = yaml.compose(text)
    lines = {node.value: node.start_mark.line + 1 for node, _ in root.value} if root else {}
    return settings_as_flags(loaded, f"--config {path}", lines)


def settings_as_flags(settings: dict, source: str, lines: Optional[dict] = None) -> list:
    """``{"num_layers": 12, "swiglu": True, ...}`` (keys with dashes or underscores) as the flags
    that set them; ``source`` names where the settings came from in error messages, ``lines``
    the line of each key there."""
    fields = _settings()
    flags = []
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            where = f"{source}, line {lines[str(key)]}" if lines and str(key) in lines else source
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean {close[0].replace('_', '-')!r}? " if close else ""
            raise SystemExit(
                f"{where}: unknown setting {key!r}; {hint}"
                f"see `pretrain_gpt.py --help` for the names."
            )
        if _base_type(fields[name].type) is bool:
            if not isinstance(value, bool):
                raise SystemExit(f"{source}: {key} must be true or false, got {value!r}.")
            flags += [_flag(name)] if value else []
        elif value is not None:
            values = value if isinstance(value, list) else [value]
            flags += [_flag(name), *map(str, values)]
    return flags


def parse_args(argv=None, world_size: Optional[int] = None) -> TrainingConfig:
    """Flags (and the ``--config`` YAML they name) -> a validated ``TrainingConfig``.

    ``world_size`` defaults to torchrun's ``WORLD_SIZE`` (1 without torchrun).
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(map(str, argv))
    config_file = parser.parse_known_args(argv)[0].config
    yaml_flags = _yaml_flags(config_file) if config_file else []
    parser.exit_on_error = False  # a bad value in the file is reported with the file's name
    try:
        parser.parse_args(yaml_flags)
    except argparse.ArgumentError as error:
        raise SystemExit(f"--config {config_file}: {error}") from None
    parser.exit_on_error = True
    namespace = vars(parser.parse_args(yaml_flags + argv))
    namespace.pop("config")
    config = TrainingConfig.from_dict(namespace)  # the flags are flat, one per setting
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return config.validate(world_size)
