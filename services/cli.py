"""The `optinfer` command line.

Every command turns a `UserError` into one clear line on stderr and exit code 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer

from optinfer.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
model_app = typer.Typer(no_args_is_help=True, help="Convert, inspect and train models.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (JSON output).")
app.add_typer(model_app, name="model")
app.add_typer(bench_app, name="bench")


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except Exception as err:  # click's own usage errors carry their exit code
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise
