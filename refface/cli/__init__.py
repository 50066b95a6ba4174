"""The ``refface`` command line: one typer app; each command group lives in its own module.

| module | commands |
|---|---|
| ``mine`` | ``embed``, ``cluster``, ``eval-clusters``, ``knn-graph`` |
| ``build`` | ``build ffhq-ref|celeba-test-ref|reface-hq``, ``validate``, ``degrade`` |
| ``data`` | ``attributes``, ``shards write|verify`` |
| ``audit`` | ``audit`` |
| ``review`` | ``review`` |
| ``export`` | ``export hf|basicsr`` |
| ``convert`` | ``convert refldm-official`` |
| ``train`` | ``train mgfr|refldm``, ``restore``, ``evaluate`` |
| ``demo`` | ``demo`` |
| ``doctor`` | ``doctor`` |

Command modules import the workflow they run inside the command, so ``refface --help`` stays fast.
"""

from __future__ import annotations

import typer

from refface.cli import audit, build, convert, data, demo, doctor, export, mine, review, train
from refface.console import setup_logging

app = typer.Typer(
    name="refface",
    help="Reference-based face restoration toolkit: mine identities, build FFHQ-Ref-style datasets, "
    "degrade, audit leakage, write shards and train ReF-LDM / MGFR.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging.")) -> None:
    setup_logging(verbose)


for _group in (data, build, mine, audit, review, export, train, convert, demo, doctor):
    _group.register(app)


def main() -> None:
    app()
