"""`python -m lofi_cli` is the `lofi` command (for an environment without the console script)."""

import sys

from lofi_cli.commands import main

sys.exit(main())
