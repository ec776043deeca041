"""meshtune: a PyTorch-native runtime for distributed training and fine-tuning.

Importing this package does not import torch, so `meshtune --help` is instant; the runtime lives in
`meshtune.runtime`, the decoder in `meshtune.models`, data in `meshtune.data`.
"""

__version__ = "0.1.0"
