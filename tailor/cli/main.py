"""The `tailor` command: the root app, which imports every subcommand and is imported by none of them.

User errors (bad data, a conflicting run folder, an unknown model or method) print one line and exit with code 2;
bugs keep Python's traceback.
"""

from __future__ import annotations

import logging
import sys

import click
import typer

from tailor.cli._options import ray_argv
from tailor.cli.data import data_app
from tailor.cli.demo import demo_command
from tailor.cli.eval import eval_command
from tailor.cli.export import export_peft_command
from tailor.cli.personalize import personalize_command
from tailor.cli.report import report_command
from tailor.cli.serve import serve_command
from tailor.cli.tenants import tenants_app

app = typer.Typer(help="Personalize a language model for each of its users.", no_args_is_help=True,
                  pretty_exceptions_enable=False)  # main() prints user errors in one line; bugs get Python's traceback
app.command("eval")(eval_command)
app.command("personalize")(personalize_command)
app.command("report")(report_command)
app.command("demo")(demo_command)
app.command("serve")(serve_command)
app.command("export-peft")(export_peft_command)
app.add_typer(data_app, name="data")
app.add_typer(tenants_app, name="tenants")

# Recent typer ships its own copy of click, whose errors are not click's classes: catch both kinds.
CLICK_ERRORS = tuple({click.ClickException,
                      *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")})
ABORTS = tuple({click.exceptions.Abort, typer.Abort})


def main() -> None:
    """Entry point: user errors (bad data, a conflicting run folder, an unknown model) print one line, exit 2."""
    from tailor.backbone.loading import ModelNotFound
    from tailor.data.download import DownloadError
    from tailor.data.lamp import DataError
    from tailor.eval.report import CompareError
    from tailor.runs.folder import RunConflict
    from tailor.runs.record import RunDirError
    from tailor.store.state import StateError
    from tailor.store.store import StoreError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        code = app(args=ray_argv(sys.argv[1:]), standalone_mode=False)  # a `typer.Exit(n)` comes back as n
    except (DataError, DownloadError, RunConflict, RunDirError, CompareError, StateError, StoreError, ModelNotFound,
            KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except ABORTS:
        raise SystemExit(130) from None
    except CLICK_ERRORS as error:
        error.show()  # type: ignore[attr-defined]
        raise SystemExit(error.exit_code) from None
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
