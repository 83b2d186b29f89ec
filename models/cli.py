"""What a TinyPallas command line does with a mistake: one line on stderr, ``error: <problem>;
<fix>``, and exit status 2; ``--debug`` prints the traceback first. Never a raw traceback.

    parser = cli.ArgumentParser(prog="python -m mcu")
    ...
    def main(argv=None) -> int:
        return cli.run(_main, argv)
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import traceback
from collections.abc import Callable, Sequence

# What a user can act on: bad values (ValueError), files (OSError), missing tools and failed
# builds (RuntimeError). Anything else is a bug, reported as one line with exit status 1.
USER_ERRORS = (ValueError, OSError, RuntimeError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (``error: ...``) instead of usage plus message."""

    def error(self, message: str):
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def run(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """``main(argv)``, with every exception turned into one ``error:`` line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except SystemExit as e:  # argparse: 0 after --help, 2 after a one-line error
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends in one line; --debug shows where it came from
        if "--debug" in argv:
            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, USER_ERRORS):
            print(f"error: {message}", file=sys.stderr)
            return 2
        print(f"error: unexpected {type(e).__name__}: {message[:500]} (a bug: please report it with the "
              "output of --debug)", file=sys.stderr)
        return 1


def input_file(text: str) -> pathlib.Path:
    """argparse ``type=``: a file that exists and is readable (the content is checked by its loader)."""
    path = pathlib.Path(text)
    if not text:
        raise argparse.ArgumentTypeError("an empty path; pass a file")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file; check the path")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; pass a file in it")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable; check its permissions")
    return path


def output_dir(text: str) -> pathlib.Path:
    """argparse ``type=``: a folder to write into, created (with its parents) if missing."""
    path = pathlib.Path(text)
    if not text:
        raise argparse.ArgumentTypeError("an empty path; name a folder")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file; name a folder (created if missing)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a folder; choose another output folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: {parent} is not writable; choose another output folder")
    return path
