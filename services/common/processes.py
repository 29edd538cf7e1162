"""How a child process ended, in words an operator can act on."""

from __future__ import annotations

import signal


def describe_exit(returncode: int) -> str:
    """``"killed by SIGSEGV (signal 11)"`` for a negative ``Popen.returncode``, else ``"exit code N"``.

    Args:
        returncode: ``subprocess.Popen.returncode``: ``-N`` when signal N ended the process (POSIX).
    """
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return f"killed by {name} (signal {-returncode})"
    return f"exit code {returncode}"
