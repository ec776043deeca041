"""Fault injection for tests and bench/bench_faults.py: put this directory on PYTHONPATH of the ranks.

    MESHTUNE_FAULT=save:meta:STEP     rank 0 sleeps inside Checkpointer.save of STEP, shards written, no meta.json yet
    MESHTUNE_FAULT=save:rename:STEP   ... meta.json written, just before step_N.tmp is renamed to step_N
    MESHTUNE_FAULT=hang:RANK:STEP     RANK sleeps before the loss all-reduce after step STEP (a stuck rank)
    MESHTUNE_FAULT=slow:SECONDS       every rank sleeps SECONDS after each step (a long run, in few steps)
    MESHTUNE_FAULT_MARK=PATH          touched when the fault starts (so a test knows when to kill); a fault
                                      whose mark exists does not fire again (after a restart)

Nothing here changes meshtune: save faults wrap pathlib (which Checkpointer.save uses), the hang wraps
Trainer.mean_loss when meshtune.runtime.trainer is imported. Without MESHTUNE_FAULT this file does nothing.
"""

import os

_FAULT = os.environ.get("MESHTUNE_FAULT", "")


def _mark() -> None:
    path = os.environ.get("MESHTUNE_FAULT_MARK")
    if path:
        open(path, "w").close()


def _sleep() -> None:
    """Sleep as the fault, once per MESHTUNE_FAULT_MARK: a restarted rank finds the mark and runs on."""
    import time

    path = os.environ.get("MESHTUNE_FAULT_MARK")
    if path and os.path.exists(path):
        return
    _mark()
    time.sleep(float(os.environ.get("MESHTUNE_FAULT_SLEEP_S", "600")))


if _FAULT.startswith("save:"):
    import pathlib

    _, _point, _step = _FAULT.split(":")
    _tmp = f"step_{int(_step):06d}.tmp"
    _write_text, _rename = pathlib.Path.write_text, pathlib.Path.rename

    def write_text(self, *args, **kwargs):
        if _point == "meta" and self.name == "meta.json" and self.parent.name == _tmp:
            _sleep()
        return _write_text(self, *args, **kwargs)

    def rename(self, target):
        if _point == "rename" and self.name == _tmp:
            _sleep()
        return _rename(self, target)

    pathlib.Path.write_text, pathlib.Path.rename = write_text, rename

elif _FAULT.startswith(("hang:", "slow:")):
    import importlib.abc
    import importlib.util
    import sys

    def _patch(module) -> None:
        if _FAULT.startswith("slow:"):
            import time

            train_step, pause = module.Trainer.train_step, float(_FAULT.split(":")[1])

            def slow_train_step(self, *args):
                out = train_step(self, *args)
                time.sleep(pause)
                return out

            module.Trainer.train_step = slow_train_step
            return
        _, rank, step = _FAULT.split(":")
        mean_loss = module.Trainer.mean_loss

        def stuck_mean_loss(self, *args):
            if os.environ.get("RANK") == rank and self.step == int(step):
                _sleep()
            return mean_loss(self, *args)

        module.Trainer.mean_loss = stuck_mean_loss

    class _PatchOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "meshtune.runtime.trainer":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchOnImport())
