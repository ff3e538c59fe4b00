"""Plumbing for main.py: what a run needs from the command line, the operating system and the cluster.

Nothing here is about LLaMA; read main.py first. `cli` holds the flags and their help, `validators`
argparse's type checks; `runtime` holds signals, the out-dir lock, progress lines, the torch.distributed
calls, the device choice and the atomic checkpoint write.
"""

from plumbing import cli
from plumbing.runtime import (
    Progress,
    Stopped,
    StopSignals,
    all_ranks_max,
    collective_errors,
    gather_from_ranks,
    lock_out_dir,
    pick_device,
    save_checkpoint,
    setup_distributed,
    teardown_distributed,
    wait_for_all_ranks,
)

__all__ = [
    "Progress", "StopSignals", "Stopped", "all_ranks_max", "cli", "collective_errors", "gather_from_ranks",
    "lock_out_dir", "pick_device", "save_checkpoint", "setup_distributed", "teardown_distributed",
    "wait_for_all_ranks",
]
