"""Where Ray's and MLflow's own messages go: a log file in the run folder, not the terminal.

A long command (`lofi demo`, `lofi pipeline`, `lofi sweep`) prints the stages' progress lines,
their summaries, the final table and the MLflow command. Ray and MLflow print much besides:
per-dataset "execution finished" lines, deprecation warnings, C++ core-worker and raylet
warnings, database-migration INFO lines. `output_to(path)` sends all of that to `path` for the
length of the command, and the terminal keeps what is lofi's own:

- Python loggers of Ray, Ray Data/Train/Tune, MLflow and alembic, and Python warnings
  (`logging.captureWarnings`), get one handler writing to the file (`reroute_loggers`, called
  again after `ray.init`, which installs handlers of its own);
- Ray prints the workers' output on the driver, stdout lines to `sys.stdout` (the stages'
  progress lines: they stay) and stderr lines to `sys.stderr` (warnings and logs of the
  workers): `sys.stderr` becomes a router that writes every line to the file and passes to the
  terminal only lines of lofi's own (starting "lofi") and progress bars (carriage returns);
  `sys.stdout` one that passes every line but the raylet's (Ray prints its warnings there).

File descriptor 2 points at the file as well (Ray's C++ core worker and the raylet write to it
directly). An exception that ends the command is printed after the router is gone, on the terminal.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TextIO

LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow", "alembic", "py.warnings", "filelock")
_active: dict[str, logging.Handler] = {}
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes Ray puts around "(raylet)"


def _lofi_line(line: str) -> bool:
    return line.startswith("lofi")


def _not_raylet(line: str) -> bool:
    return not ANSI.sub("", line).startswith("(raylet)")


class _Router(io.TextIOBase):
    """A stream that keeps the lines `keep` accepts on the terminal and sends every line to the log file."""

    def __init__(self, log: TextIO, terminal: TextIO, keep: Callable[[str], bool] = _lofi_line) -> None:
        super().__init__()
        self.log, self.terminal, self.keep, self._line = log, terminal, keep, ""

    def isatty(self) -> bool:  # tqdm and Ray Data decide on progress bars by the terminal's answer
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()

    def write(self, text: str) -> int:
        if "\r" in text:  # a progress bar redrawing itself: the terminal's alone
            self.terminal.write(text)
            return len(text)
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            self.log.write(line + "\n")
            if self.keep(line):
                self.terminal.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()


def reroute_loggers() -> None:
    """Point Ray's and MLflow's loggers at the active log file (again: ray.init replaces handlers)."""
    handler = _active.get("handler")
    if handler is None:
        return
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False


@contextmanager
def output_to(path: str | Path, command: str) -> Iterator[Path]:
    """Ray's and MLflow's messages into `path` (appended) while the block runs; says so first.

    The C-level stderr (file descriptor 2: Ray's core worker and raylet write there directly) points
    at the file too. After the block the descriptor is the terminal's again; `sys.stderr` stays the
    router when the block ends normally, since Ray prints workers' last lines after the command's own
    (the process ends right after), and is the terminal's when it raises, so the error shows;
    `sys.stdout` is the terminal's again either way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"{command}: Ray's and MLflow's own messages go to {path}", flush=True)
    sys.stderr.flush()
    log = open(path, "a", buffering=1)  # noqa: SIM115 (kept open after the block: see above)
    log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {command}: {' '.join(sys.argv)}\n")
    terminal_fd = os.dup(2)
    terminal = os.fdopen(os.dup(terminal_fd), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                         errors="backslashreplace")
    saved_stderr, saved_stdout = sys.stderr, sys.stdout
    saved = {name: (logging.getLogger(name).handlers, logging.getLogger(name).propagate) for name in LOGGERS}
    handler = logging.StreamHandler(log)
    handler.setLevel(logging.INFO)  # Ray Data's loggers pass DEBUG records to their handlers
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _active["handler"] = handler
    os.dup2(log.fileno(), 2)
    sys.stderr = _Router(log, terminal)
    sys.stdout = _Router(log, saved_stdout, keep=_not_raylet)
    logging.captureWarnings(True)
    reroute_loggers()
    try:
        yield path
    except BaseException:
        sys.stderr = saved_stderr
        _active.pop("handler", None)
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = handlers, propagate
        logging.captureWarnings(False)
        raise
    finally:
        sys.stdout.flush()
        sys.stdout = saved_stdout  # the command's own output is done: stdout is the terminal's again
        sys.stderr.flush()
        os.dup2(terminal_fd, 2)
        os.close(terminal_fd)
