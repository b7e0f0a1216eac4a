import os

import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Small tensors on a 2-core machine: one intra-op thread is faster and far more stable than two
# (for the whole session; test modules need not set it again).
torch.set_num_threads(1)
