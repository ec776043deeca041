"""`meshtune demo`: the end-to-end demo and its tables, kept apart from the library modules it drives.

stages.py trains, preempts, resumes, exports and fine-tunes through the CLI's own launcher and export;
compress.py builds and measures the compression table. Nothing in the library imports this package.
"""

from meshtune.demo.stages import run_demo

__all__ = ["run_demo"]
