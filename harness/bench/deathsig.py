"""A child that dies with its parent: ``prctl(PR_SET_PDEATHSIG)``, and a launcher that arms it for any program.

:func:`arm_parent_death_signal` asks the kernel (Linux) to send a signal to this process when its parent dies,
even by SIGKILL.  :func:`guarded` prefixes a command so that it runs with that signal armed: this file, run as
``python -I -S deathsig.py PARENT_PID CMD...`` (standard library only: no torch to import), arms SIGTERM,
unblocks the stop signals its parent blocked while starting it, checks that its parent is still the one that
started it (else exits 143 at once), and then ``exec``s ``CMD`` -- same pid, and the death signal survives the
exec.  Programs that are not ours (torchrun's agent) die with the harness so, and nothing runs in the parent
between fork and exec (``preexec_fn`` would run Python there, where a signal can leave a lock held).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["LINUX", "PR_SET_PDEATHSIG", "STOP_SIGNALS", "arm_parent_death_signal", "guarded", "main"]

LINUX = sys.platform.startswith("linux")
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def arm_parent_death_signal(signum: int = signal.SIGTERM) -> None:
    """Linux: the kernel sends ``signum`` to this process when its parent (the thread that started it) dies."""
    libc = ctypes.CDLL(None, use_errno=True)  # this process's own symbols, libc among them (no ldconfig run)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def guarded(cmd: list[str]) -> list[str]:
    """``cmd`` run so that it gets SIGTERM when this process dies (Linux; elsewhere ``cmd`` as it is)."""
    if not LINUX:
        return list(cmd)
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid()), *cmd]


def main(argv: list[str]) -> None:
    parent, cmd = int(argv[0]), argv[1:]
    arm_parent_death_signal()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(128 + signal.SIGTERM)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
