"""Launchers: torchrun argv for local and multi-node runs. No torch import here."""
