"""Errors a user can fix: the CLI (lofi_cli.args.cli_errors) prints them without a traceback and exits 2."""

from __future__ import annotations


class LofiError(Exception):
    """Bad input or config; the message names the file, video or key and says what to do."""
