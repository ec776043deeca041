import atexit
import os
import sys

from meshtune.cli import main

code = main()
if "TORCHELASTIC_RUN_ID" in os.environ:
    # A rank under torchrun ends here without the interpreter's teardown: gloo's C++ threads still holding
    # work at finalization can abort the process (`terminate called without an active exception`, exit -6,
    # seen after a restarted round; pytorch/pytorch#190489) and turn a finished job into a failed one.
    # Everything is written by now (metrics closed, checkpoint committed, process group destroyed); the
    # atexit handlers (logging, wandb, a user's) still run, with the interpreter fully alive.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
