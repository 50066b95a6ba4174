"""The ``refface`` command line: one typer app; each area registers its own commands."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="refface",
    help="Reference-based face restoration toolkit: mine identities, build FFHQ-Ref-style datasets, "
    "degrade, audit leakage, write shards and train ReF-LDM / MGFR.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

# Each module defines ``register(app)`` and imports its heavy dependencies inside the commands,
# so ``refface --help`` stays fast.
COMMAND_MODULES = [
    "refface.builders.shards_cli",
    "refface.builders.cli",
    "refface.mining.cli",
    "refface.mining.cluster_cli",
    "refface.mining.scale_cli",
    "refface.mining.audit_cli",
    "refface.review.cli",
    "refface.export.cli",
    "refface.train.eval_cli",
    "refface.train.cli",
    "refface.train.refldm.convert_cli",
    "refface.degradations.cli",
    "refface.demo",
    "refface.doctor_cli",
]


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging.")) -> None:
    from refface.console import setup_logging

    setup_logging(verbose)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
