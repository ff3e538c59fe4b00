"""Plumbing for main.py: what a run needs from the command line, the operating system and the cluster.

Nothing here is about LLaMA; read main.py first. `cli` holds the flags, their help and how they override a
preset or a resumed checkpoint; `validators` argparse's type checks; `runtime`
holds signals, the out-dir lock, progress lines, the torch.distributed calls, the device choice and the
atomic checkpoint write.
"""
