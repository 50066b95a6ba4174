"""Run the refface CLI and SIGKILL its whole process group the moment a chosen output file lands.

    python tests/common/kill_after.py <out folder> <glob relative to it> <refface arguments...>

Every output is written atomically (a temp file renamed with ``os.replace``), so wrapping
``os.replace`` stops the run exactly after the named file appears: a crash at a known point,
whatever the speed of the machine. Start it in a new session so the group holds only this run.
"""

from __future__ import annotations

import fnmatch
import os
import runpy
import signal
import sys
from pathlib import Path


def main() -> None:
    out, pattern, *argv = sys.argv[1:]
    out_dir = Path(out).resolve()
    real_replace = os.replace

    def replace_then_maybe_die(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        target = Path(os.fsdecode(dst)).resolve()
        if target.is_relative_to(out_dir) and fnmatch.fnmatch(
            target.relative_to(out_dir).as_posix(), pattern
        ):
            os.killpg(0, signal.SIGKILL)

    os.replace = replace_then_maybe_die
    sys.argv = ["refface", *argv]
    runpy.run_module("refface.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
