"""Serving personalized models over HTTP: the app (tailor.serve.app), mixed-user micro-batching
(tailor.serve.batcher) and the `tailor serve` command (tailor.serve.cli). Nothing is imported here, so that the
command line starts without loading torch."""
