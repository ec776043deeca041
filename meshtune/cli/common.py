"""What the commands share: the config arguments, `--help` with every config key, loading the config."""

from __future__ import annotations

import argparse

from meshtune.config import ConfigError


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML file, or a bundled config name from `meshtune ls` (e.g. pretrain/tiny)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-3")


class ConfigHelp(argparse.Action):
    """`--help` on train/validate/launch/slurm submit also lists every config key with its docstring."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from meshtune.schema import help_text

        parser.print_help()
        print("\nconfig keys (set in YAML or as key=value):\n" + help_text())
        parser.exit()


def config_command(sub, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand taking CONFIG [key=value ...], whose --help lists every config key."""
    p = sub.add_parser(name, help=text, description=text, add_help=False)
    p.add_argument("-h", "--help", action=ConfigHelp, help="show this help and every config key")
    config_args(p)
    return p


def overrides(args: argparse.Namespace) -> list[str]:
    """argparse puts `k=v` pairs after the config into `overrides`; reject stray words clearly."""
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted key=value, e.g. train.steps=20")
    return list(args.overrides)


def load(args: argparse.Namespace):
    """(the validated config, its overrides, the config file's path) of a config command."""
    from meshtune.config import resolve_config_path
    from meshtune.schema import load_config

    items = overrides(args)
    return load_config(args.config, items), items, str(resolve_config_path(args.config))
