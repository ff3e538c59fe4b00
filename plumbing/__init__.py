"""Plumbing for the chapters: what a run needs from the command line, the operating system, a cluster and the files
on disk. Nothing here teaches LLaMA's architecture or its training; read the chapters first. Two modules do hold facts
about Meta's files, which chapter 5 checks against: llama_files (params.json's defaults, Llama 3.1's RoPE
constants, GPT-2's byte alphabet of tokenizer.json) and llama_fixtures (Llama 3.2's params.json).
- `download`: chapter 1's corpus, fetched with its checksum checked and nothing half-written.
- `cli`: main.py's flags, their help, and how the flags go on top of a preset or a resumed checkpoint.
- `validators`: argparse's type checks; the checks of a prompt, a corpus, a checkpoint's vocabulary and the
  sampling settings that a program passes to generation.
- `runtime`: launch and teardown of a training process, signals, the out-dir lock, progress lines,
  the torch.distributed calls, the device choice and the atomic checkpoint write.
- `checkpoint`: what a checkpoint holds, saving a run's, reading one safely, and resuming from it exactly.
- `reports`: a run's first lines, its end (loss.csv, loss.png, the final lines, metrics.json), the attention figure.
- `llama_files`: chapter 5's reading of a Llama 3 directory (Meta's or Hugging Face's layout, the tokenizer).
- `llama_fixtures`: made-up Llama 3 checkpoints in both layouts, for chapter 5's demo, the tests and benchmarks.
- `chat`: chapter 5's command line: its flags, the user's turns from stdin, the answers printed as they come.
- `serving`: chapter 7's command line: its flags, the prompts file, the answers printed in order.
- `figures`: the figures of chapters 5 to 7.
- `lora_cli`: chapter 6's command line: its flags, which go together, reading an adapter file, one-line errors.
- `lora_run`: chapter 6's run machinery: its settings, the base and text it loads, resuming, and the files it writes.
- `sharding`: chapter 6 under torchrun: the frozen base sharded (FSDP2), each rank reading its own rows; saves gather.
"""
