"""``refused(main, argv, capsys, pattern)``: run a program's ``main(argv)`` on a bad input and check the
error boundary's contract (exit code 2, one ``error:`` line on stderr matching ``pattern``, no traceback)."""

from __future__ import annotations

import re

from qlip_jax.errors import run_program


def refused(main, argv, capsys, pattern: str) -> str:
    """The error line; asserts exit code 2, exactly one ``error:`` line matching ``pattern`` (a regex), and
    no traceback on stderr."""
    capsys.readouterr()
    code = run_program(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    return lines[0]
