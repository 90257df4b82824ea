"""Reading settings from a YAML file and the command line, the way `policy-split-train` does: `TrlParser` over the
config dataclasses, `--config file.yaml` for the file and a flag per field to override it.

[`ConfigFileParser`] adds what a config file needs on top of `TrlParser` (each problem with the file or one of its
keys is an error naming it; mapping fields from the command line); [`EvalParser`] reads an [`EvalConfig`]
(`policy-split-eval`), and [`~policy_split_trl.comparison.config.CompareParser`] a comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Iterable
from typing import Any

import yaml
from trl import TrlParser

from .backends import SamplingConfig
from .checks import CommandLineMapping, EvalConfigError, MappingAction, check_mapping
from .harness import SAMPLING_FIELDS, EvalConfig, flatten_sampling


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` with each flag's default, and the description (usage examples) as written."""


class ConfigFileParser(TrlParser):
    """
    A [`~trl.TrlParser`] whose config-file problems raise `error_class` naming the file or key: a file that cannot be
    read, is not UTF-8, not YAML or not a mapping, and a key that is no field (`TrlParser` would pass it on as a flag).

    Mapping fields take `NAME=VALUE` tokens or a JSON object on the command line ([`MappingAction`] in their
    metadata); what it reads becomes a plain `dict` here. `config_path` is the `--config` file of the last parse.
    """

    error_class: type[ValueError] = ValueError
    config_path: str | None = None

    def __init__(self, dataclass_types: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(dataclass_types, **kwargs)

    def config_keys(self) -> set[str]:
        """The keys a config file may set: the fields of the parsed dataclasses."""
        return {f.name for dtype in self.dataclass_types for f in dataclasses.fields(dtype) if f.init}

    def parse_args_and_config(self, args: Iterable[str] | None = None, **kwargs: Any) -> tuple[Any, ...]:
        args = list(sys.argv[1:] if args is None else args)
        self.config_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
        keep_unknown = kwargs.pop("return_remaining_strings", False)
        try:
            *parsed, unknown = super().parse_args_and_config(args, return_remaining_strings=True, **kwargs)
        except OSError as error:
            if error.filename != self.config_path:
                raise
            raise self.error_class(f"Cannot read the config file {self.config_path!r}: {error}") from None
        except UnicodeDecodeError as error:
            raise self.error_class(f"{self.config_path} is not UTF-8 text ({error}).") from None
        except yaml.YAMLError as error:  # its message gives the line and column
            raise self.error_class(f"{self.config_path} is not valid YAML: {error}") from None
        except ValueError as error:
            if type(error) is not ValueError:  # a config error of ours, already naming the field
                raise
            raise self.error_class(str(error)) from None  # TrlParser's: the file is not a YAML mapping
        if keep_unknown:
            return (*parsed, unknown)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return tuple(parsed)

    def set_defaults_with_config(self, **config: Any) -> list[str]:
        unknown = sorted(set(config) - self.config_keys())
        if unknown:
            raise self.error_class(
                f"Unknown key(s) {unknown} in {self.config_path}; valid keys: {sorted(self.config_keys())}."
            )
        return super().set_defaults_with_config(**config)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        for name, value in vars(namespace).items():
            if isinstance(value, CommandLineMapping):
                setattr(namespace, name, dict(value))
        return namespace, extras


def read_prompt_file(flag: str, name: str, path: str) -> str:
    """The system prompt of mode `name` from a UTF-8 text file (`--mode_prompt_file NAME=FILE`), stripped."""
    where = f"{flag} {name}={path}"
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise EvalConfigError(
            f"{where}: the file {what} (looked for {os.path.abspath(path)}; a relative path is relative to the "
            "working directory); pass a text file holding the mode's system prompt."
        )
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except UnicodeDecodeError as error:
        raise EvalConfigError(f"{where}: not UTF-8 text ({error}); save the prompt as UTF-8.") from None
    if not text:
        raise EvalConfigError(f"{where}: the file is empty; write the mode's system prompt in it.")
    return text


class EvalParser(ConfigFileParser):
    """
    The parser of `policy-split-eval`: every [`EvalConfig`] field as a flag, [`SamplingConfig`]'s flat
    (`--temperature 0.6`), and a YAML file (`--config eval.yaml`) whose keys are the same fields, `sampling` as a
    mapping or flat. Flags override the file; a mapping flag (`--source NAME=FILE`) adds to the file's mapping.

    Besides the fields: `--mode_prompt_file NAME=FILE` (a mode's system prompt from a file), `--no_kl` (`compute_kl`
    false) and `--judge_base_url`, `--judge_model`, `--judge_local_model` (keys of `judge`).

    ```python
    config = EvalParser().parse(["--config", "eval.yaml", "--limit", "10"])
    ```

    Raises:
        [`EvalConfigError`]: a bad field, flag value, file or key, naming it (a malformed flag exits with status 2).
    """

    error_class = EvalConfigError

    def __init__(self, prog: str | None = "policy-split-eval", **kwargs: Any):
        super().__init__((EvalConfig, SamplingConfig), prog=prog, **kwargs)
        suppress = argparse.SUPPRESS  # these flags set a field's value; they have no default of their own
        self.add_argument(
            "--mode_prompt_file",
            dest="mode_prompts",
            action=MappingAction,
            value=read_prompt_file,
            default=suppress,
            metavar="NAME=FILE",
            help="A mode's system prompt from a UTF-8 text file (repeatable).",
        )
        self.add_argument(
            "--no_kl",
            dest="compute_kl",
            action="store_false",
            default=suppress,
            help="Skip scoring non-normal modes under the normal context (compute_kl false).",
        )
        for key, metavar, what in (
            ("base_url", "URL", "the OpenAI-compatible endpoint of the creative-writing judge"),
            ("model", "NAME", "the judge model at that endpoint (key: $POLICY_SPLIT_JUDGE_API_KEY)"),
            ("local_model", "PATH", "a local transformers model as the judge instead"),
        ):
            self.add_argument(
                f"--judge_{key}",
                dest="judge",
                action=MappingAction,
                key=key,
                default=suppress,
                metavar=metavar,
                help=f"judge {key}: {what}.",
            )

    def set_defaults_with_config(self, **config: Any) -> list[str]:
        try:
            flat = flatten_sampling(config)
        except EvalConfigError as error:
            raise EvalConfigError(f"{self.config_path}: {error}") from None
        return super().set_defaults_with_config(**flat)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        # The flat flags make the `sampling` field; `--sampling NAME=VALUE` (a mapping) overrides them.
        nested = namespace.sampling if isinstance(namespace.sampling, dict) else {}
        check_mapping("sampling", nested, keys_from=SAMPLING_FIELDS)
        values = {name: nested.get(name, getattr(namespace, name)) for name in SAMPLING_FIELDS}
        namespace.sampling = SamplingConfig(**values)
        return namespace, extras

    def parse(self, args: Iterable[str] | None = None) -> EvalConfig:
        """The [`EvalConfig`] of `args` (default: the command line), with `--config FILE` read first."""
        config, _ = self.parse_args_and_config(args)
        return config
