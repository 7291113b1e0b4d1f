"""Serving personalized models over HTTP: the app, mixed-user micro-batching and the `tailor serve` command."""

from tailor.serve.app import Limits, create_app

__all__ = ["Limits", "create_app"]
