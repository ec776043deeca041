"""`meshtune slurm submit|status|cancel|logs`: a training run as a SLURM job (meshtune/launch/slurm.py)."""

from __future__ import annotations

from meshtune.cli.common import config_command, load
from meshtune.launch.slurm import LaunchError, SlurmLauncher, cancel, check_job_id, log_paths, slurm_job, status, tail


def add(sub):
    text = "submit a training run to SLURM and follow it"
    slurm = sub.add_parser("slurm", help=text, description=text)
    cmds = slurm.add_subparsers(dest="slurm_command", required=True)
    p = config_command(cmds, "submit", "render RUN_DIR/submit.sbatch for a config and submit it")
    p.add_argument("--nodes", type=int, default=1, help="nodes; one torchrun per node (default 1)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node, one rank each; 0 = CPU nodes")
    p.add_argument("--tasks-per-node", type=int, help="ranks per node on CPU nodes (default: one per GPU, or 1)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs for each node's torchrun and its ranks")
    for flag, help_ in [("--partition", "SLURM partition"), ("--time", "time limit, e.g. 4:00:00 or 1-00:00:00"),
                        ("--account", "account to charge"), ("--qos", "quality of service"),
                        ("--constraint", "node features, e.g. a100"), ("--mail", "mail this address on end/failure"),
                        ("--job-name", "job name (default meshtune-CONFIG)")]:
        p.add_argument(flag, help=help_)
    p.add_argument("--exclusive", action="store_true", help="do not share nodes with other jobs")
    p.add_argument("--rdzv-port", type=int, default=29500, help="rendezvous port on the first node")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts inside the job after a failure")
    p.add_argument("--no-requeue", action="store_true", help="do not requeue after the time-limit signal")
    p.add_argument("--signal-before", type=int, default=120, metavar="S", help="seconds before the time limit "
                   "that SIGUSR1 makes the ranks checkpoint and stop (default 120; SLURM may send it up to 60 s "
                   "earlier)")
    p.add_argument("--dry-run", action="store_true", help="write and print the script path, submit nothing")
    for name, help_ in [("status", "state, run time and log file of a job"), ("cancel", "cancel a job"),
                        ("logs", "the end of a job's stdout and stderr")]:
        c = cmds.add_parser(name, help=help_, description=help_)
        c.add_argument("job", metavar="JOB", help="job id, as printed by `meshtune slurm submit`")
        if name == "logs":
            c.add_argument("-n", "--lines", type=int, default=50, help="lines to show from each file")
            c.add_argument("--run-dir", help="where to look once SLURM has forgotten the job")
    return slurm


def run(args) -> int:
    """Run one `meshtune slurm ...` command; user errors raise LaunchError (the CLI prints one line)."""
    if args.slurm_command == "submit":
        return _submit(args)
    if args.slurm_command == "status":
        print(status(check_job_id(args.job)))
    elif args.slurm_command == "cancel":
        print(cancel(check_job_id(args.job)))
    elif args.slurm_command == "logs":
        if args.lines < 1:
            raise LaunchError(f"--lines: must be >= 1, got {args.lines}")
        for path in log_paths(check_job_id(args.job), args.run_dir):
            if path.exists() and path.stat().st_size:
                print(f"==> {path} <==\n{tail(path, args.lines)}")
    return 0




def _submit(args) -> int:
    from meshtune.cli.launch import plans_for

    cfg, overrides, config_path = load(args)  # config errors before anything is written or queued
    job = slurm_job(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                    cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
                    account=args.account, qos=args.qos, constraint=args.constraint, mail=args.mail,
                    exclusive=args.exclusive, job_name=args.job_name, rdzv_port=args.rdzv_port,
                    max_restarts=args.max_restarts, requeue=not args.no_requeue,
                    signal_before_s=args.signal_before)
    launcher = SlurmLauncher(job, cfg.run_dir)
    # the layout now, not after hours in the queue; a dry run checks it without torch
    return launcher.launch(config_path, overrides, lambda: plans_for(cfg, launcher, args.dry_run), args.dry_run)
