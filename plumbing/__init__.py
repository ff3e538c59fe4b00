"""Plumbing for main.py: what a run needs from the command line, the operating system and a cluster.

Nothing here is about LLaMA; read main.py first.
- `cli`: every flag, its help, and how the flags go on top of a preset or a resumed checkpoint.
- `validators`: argparse's type checks; the checks of a prompt, a corpus, a checkpoint's vocabulary and the
  sampling settings that a program passes to generation.
- `runtime`: launch and teardown of a training process, signals, the out-dir lock, progress lines,
  the torch.distributed calls, the device choice and the atomic checkpoint write.
- `checkpoint`: what a checkpoint holds, saving a run's, reading one safely, and resuming from it exactly.
- `reports`: a run's first lines, its end (loss.csv, loss.png, the final lines, metrics.json), the attention figure.
- `lora_cli`: chapter 6's command line: its flags, which go together, reading an adapter file, one-line errors.
"""
