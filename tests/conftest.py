"""Shared test setup: offline, quiet, deterministic, few threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Outside a Flower runtime, Messages need a task identity (the server's: node 0).
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

TaskIdentity.task_id = 1
TaskIdentity.run_id = 1
TaskIdentity.node_id = 0
