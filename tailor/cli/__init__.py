"""The `tailor` command line: `tailor.cli.main` is the root; each subcommand is a module of its own, and the options
and helpers they share live in the leaf module `tailor.cli._options`, which imports none of them."""
