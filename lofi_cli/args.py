"""What every front end shares: `--config FILE` / `--set key=value`, and user errors as one line."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Callable, TypeVar

from lofi.config import load_config
from lofi.errors import LofiError

C = TypeVar("C")


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """The `--config FILE` and `--set key=value` options every stage takes."""
    parser.add_argument("--config", default=default_config, metavar="FILE",
                        help="YAML config file" + (f" (default: {default_config})" if default_config else ""))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value by its dotted key, e.g. --set data.num_snippets=25; repeatable")


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    return load_config(cls, args.config, args.overrides)


def stage_arguments(parser: argparse.ArgumentParser, sections: tuple[str, ...]) -> argparse.ArgumentParser:
    """A training-side stage's parser: --config/--set, and an epilog ending with what makes
    `lofi pipeline` rerun the stage (its CONFIG_SECTIONS, the sections its record hashes)."""
    parser.epilog = (f"{parser.epilog or ''} Inside `lofi pipeline` this stage is reused until one of these "
                     f"config sections changes: {', '.join(sections)} (or its input stage reruns).").strip()
    add_config_arguments(parser)
    return parser


def pipeline_config(args: argparse.Namespace) -> Any:
    """The PipelineConfig of --config/--set (pipelines imported here: a front end loads it on use)."""
    from pipelines.config import PipelineConfig

    return config_from_args(PipelineConfig, args)


def cli_errors(command: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Wrap a subcommand's `main` so a LofiError ends as one clear line and exit status 2."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except LofiError as err:
                print(f"lofi {command}: error: {err}", file=sys.stderr)
                return 2

        return guarded

    return wrap
