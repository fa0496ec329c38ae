"""The conventions every qnalo command-line program follows (`qnalo`, `python -m qnalo.weights_converter`): every
error is one line on stderr, `qnalo: error: <message>`; bad input (a missing or damaged file, weights of another
model) exits with status 1, a wrong command line (an unknown option, a missing argument, options that do not go
together) with status 2; output into a pipe that closes early (`| head`) ends quietly. Also the argument types
and progress bars the programs share."""
import argparse
import os
import re
import sys
import warnings

from .errors import InputError, QnaloError, VariantMismatchError

_HANDLED_ERRORS = (QnaloError, OSError)  # OSError covers FileExistsError and FileNotFoundError
_USAGE_STATUS = 2
_BROKEN_PIPE_STATUS = 128 + 13   # what a shell reports for a process ended by SIGPIPE


class UsageError(InputError):
    """A command line that asks for something impossible: exit status 2, as argparse's own errors."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other error of the command."""

    def error(self, message):
        print(f"qnalo: error: {' '.join(message.split())} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(_USAGE_STATUS)


def run(parser, argv):
    args = parser.parse_args(argv)
    warnings.showwarning = _one_line_warning
    try:
        status = args.run(args)
        sys.stdout.flush()   # here, not at exit, so that a closed pipe is seen below
        return status
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, and keep Python's exit-time flush from reporting it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _BROKEN_PIPE_STATUS
    except UsageError as exc:
        _print_error(exc)
        return _USAGE_STATUS
    except VariantMismatchError as exc:
        _print_error(f"{exc.what}; drop --model to use the file as it is")
        return 1
    except _HANDLED_ERRORS as exc:
        _print_error(exc)
        return 1


def _print_error(error):
    message = " ".join(str(error).split()) or type(error).__name__   # one line, whatever the message holds
    print(f"qnalo: error: {_in_cli_words(message)}", file=sys.stderr)


# The library names its keyword arguments as Python spells them (force=True, device='cuda'); the command line
# names the options that set them.
_OPTION_SPELLINGS = {"force=True": "--force", "head_dim=N": "--head-dim N",
                     "window_sizes=(W0, W1, W2, W3)": "--window-sizes W0,W1,W2,W3"}
_KEYWORDS = re.compile("|".join(map(re.escape, _OPTION_SPELLINGS)) + r"|\b(device|dtype)='([^']*)'")


def _in_cli_words(message):
    return _KEYWORDS.sub(lambda m: f"--{m[1]} {m[2]}" if m[1] else _OPTION_SPELLINGS[m[0]], message)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    text = " ".join(str(message).split()).removeprefix("qnalo: ")   # the library's warnings name it already
    print(f"qnalo: warning: {_in_cli_words(text)}", file=sys.stderr)


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


class _NoBar:
    """What _progress gives when no bar is wanted: the same methods, doing nothing but writing."""
    def update(self, n=1):
        pass

    def set_description(self, text):
        pass

    def write(self, text):
        print(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress(total, unit, enabled, desc=None):
    """A tqdm bar on stderr (only where stderr is a terminal) when enabled, else a stand-in."""
    if not enabled:
        return _NoBar()
    import shutil

    from tqdm import tqdm
    # a terminal that reports no size (a bare pty: 0 x 0) makes tqdm hide the bar; shutil falls back to 80 x 24
    size = shutil.get_terminal_size()
    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, disable=None, leave=False,
                ncols=size.columns, nrows=size.lines)


def report(message, bar=None):
    line = f"qnalo: error: {message}"
    if bar is not None and not isinstance(bar, _NoBar):
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)
