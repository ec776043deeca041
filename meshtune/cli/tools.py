"""`meshtune ls` and `meshtune demo`."""

from __future__ import annotations


class Ls:
    @staticmethod
    def add(sub):
        return sub.add_parser("ls", help="list the bundled configs")

    @staticmethod
    def run(args) -> int:
        from meshtune.config import bundled_configs

        for name in bundled_configs():
            print(name)
        return 0


class Demo:
    @staticmethod
    def add(sub):
        p = sub.add_parser("demo", help="run the bundled end-to-end demo on 2 CPU ranks")
        p.add_argument("--run-dir", default="runs/demo", help="where the demo's runs go")
        p.add_argument("--nproc-per-node", type=int, default=2, help="ranks to use")
        return p

    @staticmethod
    def run(args) -> int:
        from meshtune.demo import run_demo

        return run_demo(args.run_dir, args.nproc_per_node)
