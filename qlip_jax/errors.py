"""User-input errors, the one boundary every program runs behind, and argument checks.

The library raises the exception types below for problems of the user's input (a bad argument, a file
that is missing, truncated or malformed, a quantizer or selector made for another model); anything
else is a bug and keeps its traceback. Every program's ``main`` is wrapped by :func:`program`, which
turns a :class:`QlipInputError` into one line on stderr and exit code 2::

    error: <what is wrong>; <what to do>

``--debug`` on the command line (anywhere; it is removed before parsing) or ``QLIP_DEBUG=1`` in the
environment re-raises the error with its traceback instead. argparse's own usage errors exit 2 as
always.

The argument checks (:func:`check_seed`, :func:`check_int`, :func:`check_finite`) run right after
parsing, before a model is loaded or anything is compiled. This module imports nothing of the project
(it is the bottom layer).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Sequence

SEED_MAX = 2 ** 32 - 1
"""Largest seed: the samplers draw from ``jax.random.key(uint32 seed)``, so seeds live in
``[0, 2**32 - 1]``; a larger or negative one would silently wrap onto another seed and is refused."""


class QlipInputError(Exception):
    """A problem with what the user gave (not a bug): ``problem`` says what is wrong, ``hint`` what to do."""

    def __init__(self, problem: str, hint: str | None = None):
        self.problem, self.hint = problem, hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.problem}; {self.hint}" if self.hint else self.problem

    def __str__(self) -> str:  # OSError subclasses would otherwise format their own way
        return self.message


class BadArgument(QlipInputError, ValueError):
    """A command-line value (or the equivalent function argument) out of range or malformed."""


class BadFile(QlipInputError, ValueError):
    """A file or folder that exists but cannot be used (truncated, corrupt, malformed, incomplete);
    ``path`` names it and the message starts with it."""

    def __init__(self, path: str, problem: str, hint: str | None = None):
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}", hint)


class MissingFile(QlipInputError, FileNotFoundError):
    """A file or folder that is not there (``path``)."""

    def __init__(self, path: str, problem: str | None = None, hint: str | None = None):
        self.path = str(path)
        super().__init__(problem or f"not found: {self.path}", hint)


class MismatchError(QlipInputError, ValueError):
    """Parts that do not belong together: weights, a quantizer state or a selector made for another model."""


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """``--debug`` in ``argv`` or ``QLIP_DEBUG`` set to anything but ``''``/``0``."""
    return "--debug" in (argv or ()) or os.environ.get("QLIP_DEBUG", "") not in ("", "0")


def program(main: Callable[[list[str]], int | None]) -> Callable[..., int | None]:
    """Decorator for a program's ``main(argv)``: the error boundary.

    ``argv`` (default ``sys.argv[1:]``) loses its ``--debug``; a :class:`QlipInputError` becomes
    ``error: ...`` (one line) on stderr and ``SystemExit(2)``, like argparse's usage errors; with
    ``--debug`` / ``QLIP_DEBUG=1`` it propagates with its traceback. Other exceptions (bugs) propagate.
    """

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None):
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = debug_requested(argv)
        try:
            return main([a for a in argv if a != "--debug"])
        except QlipInputError as e:
            if debug:
                raise
            print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message
            raise SystemExit(2) from None

    return wrapper


def run_program(main: Callable[..., int | None], argv: Sequence[str] | None = None) -> int:
    """Run a (wrapped) ``main(argv)`` and return its exit code instead of raising ``SystemExit``."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return 0 if code is None else code if isinstance(code, int) else 1


# ------------------------------------------------------------------------------------------------
# Argument checks (run before any work)


def check_int(value: int, name: str, lo: int | None = None, hi: int | None = None, hint: str | None = None) -> int:
    """``lo <= value <= hi`` (either bound may be None), else :class:`BadArgument` naming ``name``."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None:
            want = f">= {lo}"
        elif lo is None:
            want = f"<= {hi}"
        else:
            want = f"between {lo} and {hi}"
        raise BadArgument(f"{name} must be {want}, got {value}", hint or f"give {name} {want}")
    return value


def check_finite(value: float, name: str, lo: float | None = None) -> float:
    """A finite float (not nan/inf), ``>= lo`` if given."""
    if not math.isfinite(value):
        raise BadArgument(f"{name} must be a finite number, got {value}", f"give {name} a finite number")
    if lo is not None and value < lo:
        raise BadArgument(f"{name} must be >= {lo}, got {value}", f"give {name} >= {lo}")
    return value


def check_seed(seed: int, count: int = 1, name: str = "--seed", uses: str | None = None) -> int:
    """A seed ``S`` such that ``S .. S + count - 1`` are all valid seeds, ``[0, SEED_MAX]``.

    Seeds are unsigned 32-bit: negative seeds are refused (they would wrap to ``2**32 + S``) and so are
    seeds above ``2**32 - count`` (``--seed 4294967296`` would silently equal ``--seed 0``). ``uses`` says
    why ``count`` seeds are needed (default: prompt i uses seed S + i).
    """
    hi = SEED_MAX - max(count, 1) + 1
    what = f" ({uses or f'prompt i uses {name} + i, {count} prompts'})" if count > 1 else ""
    return check_int(seed, name, 0, hi, hint=f"seeds are unsigned 32-bit{what}: a negative or larger one would "
                                             "wrap onto another seed")


MAX_SAMPLING_STEPS = 1000
"""Largest sampling ``--steps``: SD's schedulers choose the sampling steps among 1000 training timesteps."""


def check_sampling_args(args, prompts: int = 1) -> None:
    """The checks every sampling program shares, each when ``args`` has the option: ``--steps`` in
    ``[1, MAX_SAMPLING_STEPS]``, ``--guidance`` finite, ``--seed`` valid for ``prompts`` prompts
    (prompt i uses seed S + i)."""
    if getattr(args, "steps", None) is not None:
        check_int(args.steps, "--steps", 1, MAX_SAMPLING_STEPS)
    if getattr(args, "guidance", None) is not None:
        check_finite(args.guidance, "--guidance")
    if getattr(args, "seed", None) is not None:
        check_seed(args.seed, prompts)


def describe(e: BaseException, limit: int = 240) -> str:
    """``'Type: message'`` of a low-level exception on one line, cut to ``limit`` characters (for wrapping
    a library's error into a :class:`BadFile` that names the file)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
