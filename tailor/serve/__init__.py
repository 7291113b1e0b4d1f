"""Serving personalized models over HTTP: the app (`tailor.serve.app`) and its parts. Nothing is imported here, so
that the command line starts without loading torch; the `tailor serve` command is `tailor.cli.serve`."""
