"""Plumbing for main.py and chapters 5-6: what a run needs from the command line, the operating system, a cluster
and the files on disk. Nothing here is about LLaMA; read the chapters first.
- `cli`: every flag, its help, and how the flags go on top of a preset or a resumed checkpoint.
- `validators`: argparse's type checks; the checks of a prompt, a corpus, a checkpoint's vocabulary and the
  sampling settings that a program passes to generation.
- `runtime`: launch and teardown of a training process, signals, the out-dir lock, progress lines,
  the torch.distributed calls, the device choice and the atomic checkpoint write.
- `checkpoint`: what a checkpoint holds, saving a run's, reading one safely, and resuming from it exactly.
- `reports`: a run's first lines, its end (loss.csv, loss.png, the final lines, metrics.json), the attention figure.
- `llama_files`: chapter 5's reading of a Llama 3 directory (Meta's or Hugging Face's layout, the tokenizer).
- `chat`: chapter 5's command line: its flags, the user's turns from stdin, the answer printed as it comes.
- `lora_cli`: chapter 6's command line: its flags, which go together, reading an adapter file, one-line errors.
"""
