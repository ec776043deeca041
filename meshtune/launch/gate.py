"""torchrun, started early and held: `python -m meshtune.launch.gate FD TORCHRUN_ARGS...`.

`meshtune launch` starts this while it runs its own start-up checks (runtime/preflight.py), so torchrun's
interpreter start and torch import (~1 s) overlap them instead of following them. Nothing rank-related happens
here until the launcher writes "1" to file descriptor FD: then it is torchrun with TORCHRUN_ARGS. Anything else
(the checks refused the input, or the launcher died and the pipe closed) ends it with exit code 0, having
started no rank and written nothing.
"""

from __future__ import annotations

import os
import sys

GO = b"1"


def main(argv: list[str]) -> int:
    fd = int(argv[0])
    from torch.distributed import run  # the slow part, before the launcher's answer

    go = os.read(fd, 1)
    os.close(fd)
    if go != GO:
        return 0
    run.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
