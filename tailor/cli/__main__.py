"""`python -m tailor.cli ...` runs the `tailor` command."""

from tailor.cli.main import main

main()
