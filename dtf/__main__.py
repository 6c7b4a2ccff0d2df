"""`python -m dtf` is the `dtf` command (how `dtf up` starts its child processes)."""

from dtf.cli import main

main()
