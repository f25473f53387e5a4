"""Command-line plumbing shared by train.py, generate.py and evaluate.py: checked flag types, help that shows
defaults, one-line refusals.

A bad value is refused while the flags are parsed, before any model is loaded or any file written, with one line
that names the flag, the value and what is allowed:

    train.py: error: argument --beta: 0 is out of range (allowed: a number > 0) (see train.py -h)

A user error found later (a model directory with a corrupt file, say) raises UserError; `run` turns it into one
line `error: <message>` and exit status 1, and so does a fault of the machine (a full disk, a read-only folder).
Ctrl-C and SIGTERM end with one line saying that the same command resumes. Any other exception keeps its
traceback (it is a bug to report).
"""

import argparse
import errno
import math
import os
import shlex
import signal
import sys
import threading


class UserError(ValueError):
    """Bad input the user can fix (a file, a folder, a flag): the message names it and says what is wrong."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written, and each flag's default after its help. None and off switches show no
    default: "(default: None)" tells the user nothing the help does not already say."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with the shared help format, whose errors are one line: `prog: error: ...` and exit status 2. The
    full usage of a 40-flag script above the error would push the one line that matters off the screen."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _bounds(lo, hi, lo_open, hi_open, what):
    """'an integer >= 1', 'a number > 0', 'a number from 0 to 1', ... for the refusal line."""
    if lo is not None and hi is not None and not (lo_open or hi_open):
        return f"{what} from {lo} to {hi}"
    parts = []
    if lo is not None:
        parts.append((">" if lo_open else ">=") + f" {lo}")
    if hi is not None:
        parts.append(("<" if hi_open else "<=") + f" {hi}")
    return f"{what} " + " and ".join(parts)


def int_in(lo=None, hi=None):
    """An argparse type: an integer in [lo, hi] (either end may be None)."""

    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            allowed = _bounds(lo, hi, False, False, "an integer")
            raise argparse.ArgumentTypeError(f"{v} is out of range (allowed: {allowed})")
        return v

    parse.__name__ = "int"  # argparse names the type in some messages
    return parse


def float_in(lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: a finite number between lo and hi, each end closed unless *_open."""

    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not math.isfinite(v):  # nan passes every comparison below, so it is refused by name
            raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
        low = lo is not None and (v <= lo if lo_open else v < lo)
        high = hi is not None and (v >= hi if hi_open else v > hi)
        if low or high:
            allowed = _bounds(lo, hi, lo_open, hi_open, "a number")
            raise argparse.ArgumentTypeError(f"{s} is out of range (allowed: {allowed})")
        return v

    parse.__name__ = "float"
    return parse


positive_int = int_in(1)
non_negative_int = int_in(0)
positive_float = float_in(0, lo_open=True)
non_negative_float = float_in(0)
fraction = float_in(0, 1)


def device(s):
    """An argparse type: a torch device string this machine has ('cpu', 'cuda', 'cuda:1', 'mps')."""
    import torch  # evaluate.py's file scorers stay light: torch is imported only when --device is given

    try:
        dev = torch.device(s)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{s!r}: CUDA is not available on this machine (use cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{s!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return s


def names_in(allowed):
    """An argparse type: comma-separated names, each one of `allowed` or a dotted path ending in one
    ('layers.0.self_attn.q_proj'); kept as the string given."""

    def parse(s):
        names = s.split(",")
        bad = [n for n in names if n.rsplit(".", 1)[-1] not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{','.join(repr(n) for n in bad)} not among {','.join(allowed)}")
        return s

    parse.__name__ = "names"
    return parse


def directory(s):
    """An argparse type: a folder to write in, made if missing; refused if empty or an existing file."""
    if not s.strip():
        raise argparse.ArgumentTypeError("an empty path (give a folder)")
    if os.path.exists(s) and not os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"{s} is a file, not a folder")
    return s


def with_flag(argv, flag, value):
    """argv with `flag`'s value replaced by `value` (both `--flag v` and `--flag=v`), as one quoted shell string:
    the command a refusal suggests keeps every other flag the user typed."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == flag and i + 1 < len(argv):
            out += [flag, str(value)]
            i += 2
            continue
        out.append(f"{flag}={value}" if a.startswith(flag + "=") else a)
        i += 1
    return shlex.join(out)


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds as Ctrl-C does: temp files are removed, the lock is
    let go."""


def _stopped(signum, frame):
    raise Stopped()


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def run(main, argv=None):
    """Run a script's main(argv); a UserError ends it with one line `error: <message>` (exit status 1), as do a full
    disk and a folder it may not write to; Ctrl-C (exit status 130) and SIGTERM (143) end it with one line too.
    Each script's `__main__` calls this, and so do the tests, so both see the same behaviour."""
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _stopped) if main_thread else None
    try:
        return main(argv)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt as e:
        # Every write is a temp file then a rename, or an append whose cut last line the resume drops: what was
        # finished is on disk whole.
        how, code = ("SIGTERM", 143) if isinstance(e, Stopped) else ("Ctrl-C", 130)
        print(f"stopped by {how}; finished work is kept: run the same command again to resume", file=sys.stderr)
        raise SystemExit(code) from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        if e.errno in DISK_FULL:
            raise SystemExit(f"error: {where}{e.strerror}. The files written so far are intact (each is written to "
                             "a temp file, then renamed): free some space and run the same command again to "
                             "resume") from None
        if e.errno in NOT_WRITABLE:
            raise SystemExit(f"error: {where}{e.strerror}") from None
        raise
    finally:
        if old is not None:  # None: the handler was not set from Python, and cannot be put back from it
            signal.signal(signal.SIGTERM, old)
