"""What every TinyPallas command line (``python -m autotune``, ``mcu``, ``models.diff``,
``models.llama``) does with a mistake: one line on stderr, ``error: <problem>; <fix>``, exit
status 2; ``--debug`` prints the traceback first. Never a raw traceback.

    parser = cli.ArgumentParser(prog="python -m mcu")
    ...
    def main(argv=None) -> int:
        return cli.run(_main, argv)

The argparse ``type=`` checks shared by the command lines live here too, so that a bad number,
name or path is refused the same way everywhere.
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import sys
import traceback
from collections.abc import Callable, Sequence

# What a user can act on: bad values (ValueError), files (OSError), missing tools and failed
# builds (RuntimeError). Anything else is a bug, reported as one line with exit status 1.
USER_ERRORS = (ValueError, OSError, RuntimeError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (``error: ...``) instead of usage plus message.

    ``parser.lazy_epilog = fn``: the help's epilog is ``fn()``, computed only when help is printed
    (e.g. a list that imports every kernel module).
    """

    lazy_epilog: Callable[[], str] | None = None

    def error(self, message: str):
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)

    def format_help(self) -> str:
        if self.lazy_epilog is not None:
            self.epilog = self.lazy_epilog()
        return super().format_help()


def add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug``: ``run`` prints the traceback before the error line (it reads ``argv`` itself, so
    the flag may stand on any parser of a command line)."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")


def run(main: Callable[[list[str]], int], argv: Sequence[str] | None = None, *,
        user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """``main(argv)``, with every exception turned into one ``error:`` line.

    user_errors: exception types that are the user's to fix beyond ``USER_ERRORS`` (e.g. a
        database driver's errors for a storage URL); exit status 2 like them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except SystemExit as e:  # argparse: 0 after --help, 2 after a one-line error
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`| head`): nothing is wrong, nothing to say
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except (OSError, ValueError):
            pass
        return 0
    except Exception as e:  # noqa: BLE001 - every failure ends in one line; --debug shows where it came from
        if "--debug" in argv:
            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, USER_ERRORS + tuple(user_errors)):
            print(f"error: {message}", file=sys.stderr)
            return 2
        print(f"error: unexpected {type(e).__name__}: {message[:500]} (a bug: please report it with the "
              "output of --debug)", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------
# argparse ``type=`` checks: each raises ArgumentTypeError, which the parser turns into one line
# ---------------------------------------------------------------------------------------------

def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bound = f"{low} or more" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"{value} must be {bound}")
        return value

    return parse


def seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of seconds > 0")
    return value


def name(text: str) -> str:
    """A name that is safe in file names and study names."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", text):
        raise argparse.ArgumentTypeError(f"{text!r} must be 1-100 letters, digits, '.', '_' or '-'")
    return text


def input_file(text: str) -> pathlib.Path:
    """A file that exists and is readable (the content is checked by its loader)."""
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


def output_file(text: str) -> pathlib.Path:
    """A file to write, in a folder that exists."""
    path = pathlib.Path(text)
    if not text:
        raise argparse.ArgumentTypeError("an empty path; name a file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file name, e.g. {path / 'configs.json'}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {path.parent} does not exist; create it or write elsewhere")
    return path


def output_dir(text: str) -> pathlib.Path:
    """A folder to write into, created (with its parents) if missing."""
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
