"""``python -m refface.cli``: the ``refface`` command."""

from refface.cli import main

main()
