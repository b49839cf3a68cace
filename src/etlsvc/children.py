"""Child processes never outlive etlsvc: the embedded PostgreSQL and the parsing workers.

Owns asking the kernel (Linux ``prctl(PR_SET_PDEATHSIG)``) to signal a child when its
parent dies, so that even a ``kill -9`` of etlsvc leaves no orphan behind.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies.

    With ``parent`` (the pid the parent had), exit at once if it is already gone: it may
    have died before the request was made.
    """
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    if parent is not None and os.getppid() != parent:
        os._exit(1)
