"""Regenerate every figure the README shows, into docs/figures/.

    python docs/make_figures.py

runs each chapter script as `python 0N_....py --fig-dir docs/figures` would (in this process, so
torch loads once), then trains main.py's default CPU model for --max-iters steps in a temporary
out-dir and copies its loss curve, and its attention over a line of Shakespeare, in as
main_loss.png and main_attention.png. Flags this script does not know go to the training run, so a
quick check is e.g.

    python docs/make_figures.py --max-iters 20 --dim 32 --n-layers 1 --fig-dir /tmp/figures
"""

import argparse
import runpy
import shutil
import sys
import tempfile
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ["01_input_block.py", "02_normalization_and_rope.py", "03_attention.py",
            "04_feedforward_and_transformer_block.py", "05_llama3_tokenizer_and_weights.py", "06_lora_finetuning.py",
            "07_batching_and_int8.py"]


def run(script: str, *flags: str) -> None:
    """`python script flags...`, in this process: torch is imported once, not once per script."""
    print(f"$ python {script} {' '.join(flags)}", flush=True)
    with mock.patch.object(sys, "argv", [script, *flags]), mock.patch.object(sys, "path", [str(ROOT), *sys.path]):
        runpy.run_path(str(ROOT / script), run_name="__main__")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="corpus (default: data/tinyshakespeare.txt, downloaded if missing)")
    parser.add_argument("--fig-dir", type=Path, default=ROOT / "docs" / "figures", help="where the PNGs go")
    parser.add_argument("--max-iters", type=int, default=None,
                        help="training steps for the loss and attention plots (default: the default run's)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="keep the training run (checkpoint, loss.csv) here (default: a temporary folder)")
    args, train_flags = parser.parse_known_args(argv)
    fig_dir = args.fig_dir.resolve()
    data = ["--data", str(args.data.resolve())] if args.data else []

    for chapter in CHAPTERS:
        run(chapter, "--fig-dir", str(fig_dir), *(data if chapter.startswith(("01", "05")) else []))
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = str(args.out_dir.resolve()) if args.out_dir else tmp
        steps = [] if args.max_iters is None else ["--max-iters", str(args.max_iters),
                                                   "--eval-interval", str(max(1, args.max_iters // 10))]
        run("main.py", *data, "--out-dir", out_dir, *steps, *train_flags)
        run("main.py", "--sample", "--plot-attention", "--max-new-tokens", "0", "--out-dir", out_dir)
        shutil.copy(Path(out_dir) / "loss.png", fig_dir / "main_loss.png")
        shutil.copy(Path(out_dir) / "figures" / "main_attention.png", fig_dir / "main_attention.png")
    for path in sorted(fig_dir.glob("*.png")):
        print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
