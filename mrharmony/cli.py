"""The one command-line interface: ``mrharmony``.

User errors (bad protocol, unknown scanner, impossible timing, missing file, a file that
would be overwritten without ``--force``) print one line and exit with status 2;
``--verbose`` prints the traceback as well.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

import click

from mrharmony import __version__
from mrharmony.cliutil import LazyGroup
from mrharmony.errors import MrHarmonyError

__all__ = ["cli", "main", "run"]

USER_ERRORS = (MrHarmonyError, FileExistsError, FileNotFoundError, IsADirectoryError)


LAZY_COMMANDS = {
    "seq": "mrharmony.sequences.cli:seq",
    "convert": "mrharmony.formats.cli:convert",
    "phantom": "mrharmony.phantoms.cli:phantom",
    "simulate": "mrharmony.simulation.cli:simulate",
    "site": "mrharmony.simulation.cli:site",
    "recon": "mrharmony.recon.cli:recon",
    "serve": "mrharmony.recon.stream_cli:serve",
    "stream": "mrharmony.recon.stream_cli:stream",
    "scan": "mrharmony.study.scan_cli:scan",
    "harmonize": "mrharmony.harmonize.cli:harmonize",
    "evaluate": "mrharmony.harmonize.cli_eval:evaluate",
    "study": "mrharmony.study.cli:study",
    "validate": "mrharmony.study.validate_cli:validate",
    "bench": "mrharmony.study.bench_cli:bench",
}


@click.group(cls=LazyGroup, lazy_commands=LAZY_COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="mrharmony")
@click.option("--verbose", is_flag=True, help="Show full tracebacks for errors.")
def cli(verbose: bool) -> None:
    """mrharmony: vendor-agnostic MRI from Pulseq sequences to harmonized statistics.

    \b
    Sequences:      mrharmony seq list | build | build-all | check | plot | header
    Phantoms:       mrharmony phantom make | cohort | show
    Simulation:     mrharmony simulate | site list
    Reconstruction: mrharmony recon | serve | stream | scan
    Harmonization:  mrharmony harmonize combat | apply | image | dataset | train; evaluate
    Studies:        mrharmony study run | check
    Benchmark:      mrharmony bench --quick -o DIR
    """


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for user errors)."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args
    try:
        cli.main(args=args, prog_name="mrharmony", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("mrharmony: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return 2
    except USER_ERRORS as exc:
        if verbose:
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        click.echo(f"mrharmony: error: {message}", err=True)
        return 2
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def run() -> None:
    """Console-script entry point: exit with :func:`main`'s status."""
    sys.exit(main())
