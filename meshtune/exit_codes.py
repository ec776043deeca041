"""What meshtune's exit codes mean, for `meshtune train`, `meshtune launch` and the SLURM script alike, so a
job script (and a user) can tell a requeue from a crash. The README's "Exit codes" lists them."""

OK = 0
FAILED = 1  # a rank failed; its one line names the rank, the step and the cause
CONFIG = 2  # bad input, reported before any rank started (or by every rank, at its start)
STUCK = 3  # a rank sat in one call for parallel.timeout_s, or the job's store stopped answering
# stopped on SIGTERM, SIGINT or SIGUSR1 after saving a checkpoint at the step it reached; `checkpoint.resume:
# auto` (the default) continues from it. 75 is sysexits' EX_TEMPFAIL: a temporary failure, try again.
STOPPED = 75

# the line the first rank of each node prints after such a stop; `meshtune launch` reads it to exit STOPPED
STOPPED_LINE = "meshtune: stopped at step "
