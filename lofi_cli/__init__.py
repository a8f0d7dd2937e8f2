"""The `lofi` command: one argparse front end per subcommand over a stage's or a tool's `run()`.

The layer above everything: it may import `lofi`, `pipelines` and `tuning`; nothing imports it.
`lofi_cli.commands.COMMANDS` is the table of subcommands.
"""
