"""Plumbing for main.py: what a run needs from the command line, the operating system and the cluster.

Nothing here is about LLaMA; read main.py first. `validators` holds argparse's type checks;
`runtime` holds signals, the out-dir lock, progress lines and the torch.distributed calls.
"""

from plumbing.runtime import (
    Progress,
    Stopped,
    StopSignals,
    all_ranks_max,
    collective_errors,
    gather_from_ranks,
    lock_out_dir,
    setup_distributed,
    teardown_distributed,
    wait_for_all_ranks,
)
from plumbing.validators import (
    context_length,
    dropout_type,
    non_negative_int,
    positive_float,
    positive_int,
    resume_type,
    seed_type,
    temperature_type,
    top_p_type,
)

__all__ = [
    "Progress", "StopSignals", "Stopped", "all_ranks_max", "collective_errors", "gather_from_ranks", "lock_out_dir",
    "setup_distributed", "teardown_distributed", "wait_for_all_ranks",
    "context_length", "dropout_type", "non_negative_int", "positive_float", "positive_int", "resume_type",
    "seed_type", "temperature_type", "top_p_type",
]
