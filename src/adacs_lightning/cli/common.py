"""What the command-line tools share: the help format and the console entry (no PyTorch)."""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from ..errors import AdaCSError


def finite_float(text: str) -> float:
    """An argparse ``type`` for float flags: a finite number (``nan``, ``inf`` are refused with the flag named)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: …)`` to an option's help unless the default is None or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


def console_main(prog: str, run: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run ``run(argv)`` as the console script ``prog``: a user error is one line on stderr and exit status 2."""
    try:
        run(sys.argv[1:] if argv is None else argv)
    except AdaCSError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # for bug reports
            traceback.print_exception(error)
        print(
            f"{prog}: Could not write {error.filename or 'an output file'} ({error.strerror}). The files written "
            "before it are complete; free disk space (or choose another output folder) and run the command again.",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
