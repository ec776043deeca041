"""A pool of long-lived gloo ranks that runs test cases on every rank.

Starting fresh processes per distributed test costs 7-10 s on a 2-core CPU machine; a pool of
ranks that stays up for the whole session costs that once, then 0.02-0.7 s per case. Ranks are
forked by a forkserver that imported torch once (~2.5 s per session), so a pool of any size
starts, or respawns after a failure, in ~0.1 s.

    pool = RankPool(2)
    results = pool.run(my_case, 3, lr=0.1)  # my_case(3, lr=0.1) on ranks 0 and 1; [r0, r1]
    pool.close()

Each rank sees the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) and an initialized default gloo process group, so code under test runs
unchanged. Case functions must be module-level (pickled by qualified name). Before every case each
rank seeds torch, random and numpy (if installed) with the same seed, so a case is reproducible.

On the first rank error, a rank that dies, or no answer within `timeout_s`, the pool is killed
(the other ranks are probably stuck in a collective) and `RankError` is raised; the next `run`
respawns it. Process groups a case creates (`new_group`, `init_device_mesh`) are left alive:
destroying a group only some ranks still use can hang, and DTensor and DeepSpeed cache groups across
cases. A few idle groups are cheap, hundreds are not (each gloo group keeps threads that wake on their
own): tests/conftest.py stops the pools after each test module, and `restart()` drops them at once. A
case that destroys the default group is reported as an error (and the pool respawns).
"""

import atexit
import multiprocessing
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

# torch is imported inside functions: conftest imports this module only when a test needs a pool.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
_STARTUP_TIMEOUT_S = 120.0  # importing torch on 4 ranks sharing 2 cores takes seconds
_GRACE_S = 2.0  # let gloo's own timeout (which carries a traceback) fire before ours
_POLL_S = 0.1
# Imported once by the forkserver (a fresh interpreter, never a fork of pytest) before it forks
# ranks. Nothing here may start threads or touch CUDA; importing torch does neither.
_PRELOAD = ["torch", "torch.distributed", "pytest", "tests.rankpool"]


class RankError(RuntimeError):
    """A rank raised, died, or did not answer in time.

    Attributes:
        rank: The first failing rank (for timeouts: the first rank that did not answer).
        ranks: All ranks named by the failure.
        remote_traceback: The rank's formatted traceback, or a description of how it failed.
    """

    def __init__(self, ranks: list[int], remote_traceback: str):
        self.ranks = list(ranks)
        self.rank = self.ranks[0]
        self.remote_traceback = remote_traceback
        names = ", ".join(str(r) for r in self.ranks)
        super().__init__(f"rank {names}: {remote_traceback}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _to_cpu(obj):
    """Detach tensors and move them to CPU inside lists, tuples and dicts, so results pickle."""
    import torch

    dtensor = sys.modules.get("torch.distributed.tensor")  # not loaded: obj is no DTensor
    if dtensor is not None and isinstance(obj, dtensor.DTensor):
        return obj.to_local().detach().cpu()  # the local shard: full_tensor() is a collective
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_cpu(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _seed_everything(seed: int) -> None:
    import random

    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed)


def _worker(rank, world_size, port, timeout_s, repo_root, tasks, results):
    """Rank main loop: init gloo, then run (case_id, pickled (fn, args, kwargs), seed) tasks."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    except BaseException:  # noqa: BLE001 - e.g. the port was taken between choice and bind
        results.put(("err", rank, None, traceback.format_exc()))
        return
    results.put(("ready", rank, None, None))
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if not multiprocessing.parent_process().is_alive():  # the session died: exit
                return
            continue
        if task is None:
            dist.destroy_process_group()
            return
        case_id, payload, seed = task
        try:
            fn, args, kwargs = pickle.loads(payload)
            _seed_everything(seed)
            reply = ("ok", pickle.dumps(_to_cpu(fn(*args, **kwargs))))
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            reply = ("err", traceback.format_exc())
        if reply[0] == "ok" and not dist.is_initialized():
            reply = ("err", "the case destroyed the default process group")
        results.put((reply[0], rank, case_id, reply[1]))


class RankPool:
    """`world_size` long-lived gloo ranks on this machine that run module-level functions.

    Args:
        world_size: Number of ranks.
        timeout_s: Seconds a case may take; also gloo's collective timeout, so a hung
            collective fails on the rank with a traceback a little before the pool gives up.
        seed: Seed set on every rank before every case.
        start_method: "forkserver" (default): one fresh interpreter imports torch once and
            forks every rank, so a pool starts or respawns in ~0.1 s; "spawn": every rank
            imports torch itself (~4 s per 2-rank pool, ~9 s for 4 ranks on 2 cores).
    """

    def __init__(self, world_size: int, timeout_s: float = 120, seed: int = 0,
                 start_method: str = "forkserver"):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
        self.start_method = start_method
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.seed = seed
        self._procs = []
        self._case_id = 0
        atexit.register(self.close)

    def run(self, fn, *args, **kwargs) -> list:
        """Run `fn(*args, **kwargs)` on every rank.

        Returns:
            One result per rank, in rank order, with tensors detached and on CPU.

        Raises:
            RankError: a rank raised, died, or did not answer within `timeout_s`;
                the pool is killed and respawns on the next call.
        """
        payload = pickle.dumps((fn, args, kwargs))  # fails here, not in a rank, for lambdas
        for attempt in range(3):  # the free port we picked can be taken before rank 0 binds it
            if self._procs:
                break
            try:
                self._start()
            except RankError:
                if attempt == 2:
                    raise
        self._case_id += 1
        for task_queue in self._tasks:
            task_queue.put((self._case_id, payload, self.seed))
        replies = self._collect(self._case_id, self.timeout_s + _GRACE_S)
        return [pickle.loads(replies[r]) for r in range(self.world_size)]

    def restart(self) -> None:
        """Kill the ranks (dropping every process group cases left); the next run respawns."""
        self._kill()

    def close(self) -> None:
        """Stop the ranks: politely if they are idle, by force otherwise."""
        if not self._procs:
            return
        for task_queue in self._tasks:
            task_queue.put(None)
        deadline = time.monotonic() + 2
        for proc in [p for p in self._procs if p.pid is not None]:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        self._kill()

    def _start(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            ctx.set_forkserver_preload(_PRELOAD)
        port = _free_port()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(
                target=_worker, name=f"rankpool-rank{rank}",
                args=(rank, self.world_size, port, self.timeout_s, _REPO_ROOT,
                      self._tasks[rank], self._results),
            )
            for rank in range(self.world_size)
        ]
        try:
            for proc in self._procs:
                proc.start()
        except BaseException:
            self._kill()
            raise
        self._collect(None, max(_STARTUP_TIMEOUT_S, self.timeout_s))

    def _collect(self, case_id, timeout_s: float) -> dict:
        """Wait for one reply per rank to `case_id` (None: the startup "ready")."""
        replies = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.world_size:
            try:
                kind, rank, reply_id, value = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if r not in replies and not p.is_alive()]
                if dead:
                    codes = ", ".join(f"rank {r}: {self._procs[r].exitcode}" for r in dead)
                    self._kill()
                    raise RankError(dead, f"process died (exit codes {codes})") from None
                if time.monotonic() > deadline:
                    missing = [r for r in range(self.world_size) if r not in replies]
                    self._kill()
                    raise RankError(missing, f"no answer within {timeout_s:.0f} s") from None
                continue
            if kind == "err":
                self._kill()
                raise RankError([rank], f"raised\n{value}")
            if reply_id == case_id:
                replies[rank] = value
        return replies

    def _kill(self) -> None:
        started = [proc for proc in self._procs if proc.pid is not None]
        for proc in started:
            if proc.is_alive():
                proc.kill()
        for proc in started:
            proc.join(timeout=10)
        # A rank killed mid-put may hold a queue's lock: never reuse queues across pools.
        for q in [*getattr(self, "_tasks", []), getattr(self, "_results", None)]:
            if q is not None:
                q.cancel_join_thread()
                q.close()
        self._procs, self._tasks, self._results = [], [], None
