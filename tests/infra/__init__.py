"""Test infrastructure started by the tests themselves (local SLURM cluster)."""
