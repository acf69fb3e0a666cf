"""The command line of the table scripts that train into a workdir and then measure
(``experiments.quant_quality``, ``experiments.early_exit_curve``): ``--workdir DIR [--smoke]``,
and a one-line message instead of a traceback for a missing file or a bad value."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags


def define_flags() -> None:
    """``--workdir`` (required; trained first if empty) and ``--smoke``."""
    flags.DEFINE_string("workdir", None, "Training workdir (trained first if empty).")
    flags.DEFINE_bool("smoke", False, "Tiny run (seconds).")
    flags.mark_flag_as_required("workdir")


def make_main(name: str, run: Callable[..., object]) -> Callable[[list[str]], int]:
    """An ``absl.app`` main calling ``run(workdir, smoke=...)``; exit code 1 with
    ``name: message`` on stderr for a ``FileNotFoundError`` or ``ValueError``."""

    def main(argv) -> int:
        del argv
        try:
            run(flags.FLAGS.workdir, smoke=flags.FLAGS.smoke)
        except (FileNotFoundError, ValueError) as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 1
        return 0

    return main
