"""Errors a user can fix: the CLI prints them without a traceback and exits with status 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class LofiError(Exception):
    """Bad input or config; the message names the file, video or key and says what to do."""


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
