"""Chapter 1: the input block. From a text file to batches of token ids.

A language model never sees text, only integers. LLaMA 3 uses a 128K-token BPE
vocabulary (tiktoken); we use the simplest tokenizer that still works: one token
per character. Like LLaMA 3 we put the special tokens after the ordinary ones:
`<|begin_of_text|>` (BOS) and `<|end_of_text|>` (EOS). We need no padding token
(Meta's tokenizer has one, `<|finetune_right_pad_id|>`): every window is full.

    text --CharTokenizer.encode--> ids (numpy int64) --split--> train / val
    train --get_batch--> y = ids[i : i+T],  x = [BOS] + ids[i : i+T-1]

`x` is `y` shifted right by one, with BOS in front: at every position the model
predicts the next character. LLaMA 3 generates from `<|begin_of_text|>` + prompt,
so every training window opens with BOS too: the model learns what BOS means
(a start with no context), and generation starts from an input it was trained on.
The corpus has no document ends, so EOS never occurs in training.

The last 10% of the corpus is held out for validation, as nanoGPT does, so our
losses compare with published figures.

Real LLaMA 3 reads byte-level BPE tokens (128,256 of them, about 3.7 characters each), not
characters: chapter 5 builds that tokenizer, once the model is complete.

Needs: nothing from the other chapters (plumbing/download.py fetches the corpus on first use).
Run:   python 01_input_block.py [--data PATH]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from plumbing.download import download

# Where the corpus comes from, and the SHA-256 of its bytes (the download checks it).
DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATA_PATH = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt"

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SPECIAL_TOKENS = [BOS, EOS]
VISIBLE = {" ": "␣", "\n": "\\n"}  # how figures show space and newline


def load_text(path: str | Path | None = None) -> str:
    """Read the corpus: `path` if given, else data/tinyshakespeare.txt, downloading it if missing.

    Raises:
        FileNotFoundError / IsADirectoryError: `path` is missing, or not a regular file.
        ValueError: the file is empty or not UTF-8 text.
    """
    if path is None:
        path = DEFAULT_DATA_PATH
        if not path.exists():
            download(DATA_URL, path, DATA_SHA256)  # with a progress line and the checksum checked
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file")
    if not path.is_file():  # a directory, a device such as /dev/null, a pipe: nothing to train on
        raise IsADirectoryError(f"--data {path}: not a regular file; give a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path}: not UTF-8 text (byte {e.start}); give a plain text file") from e
    if not text:
        raise ValueError(f"--data {path}: the file is empty")
    return text


class CharTokenizer:
    """One token per character, then LLaMA-style special tokens at the end of the vocabulary."""

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.itos = self.chars + SPECIAL_TOKENS
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.bos_id, self.eos_id = (self.stoi[s] for s in SPECIAL_TOKENS)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary is the sorted set of characters that occur in `text`."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text to token ids, optionally wrapped in BOS ... EOS.

        Raises:
            ValueError: `text` has characters outside the vocabulary (it names them).
        """
        unknown = sorted(set(text) - set(self.chars))
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {' '.join(map(repr, unknown))}; "
                             f"use only characters that occur in the training text")
        ids = [self.stoi[c] for c in text]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        """Token ids to text; special tokens come out as their names."""
        return "".join(self.itos[i] for i in ids)

    def to_dict(self) -> dict:
        """Plain data (a checkpoint stores it and `from_dict` restores the same tokenizer)."""
        return {"chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        return cls(d["chars"])


def train_val_split(ids: np.ndarray, train_fraction: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """First 90% for training, last 10% for validation (nanoGPT's split)."""
    n = int(train_fraction * len(ids))
    return ids[:n], ids[n:]


def inputs_for(targets: torch.Tensor, bos_id: int) -> torch.Tensor:
    """The model's inputs for windows of targets: BOS, then the targets shifted right by one.

    (batch, T) targets [d_i .. d_i+T-1] -> (batch, T) inputs [BOS, d_i .. d_i+T-2].
    """
    return torch.cat([torch.full_like(targets[:, :1], bos_id), targets[:, :-1]], dim=1)


def get_batch(
    data: np.ndarray, batch_size: int, seq_len: int, bos_id: int, generator: torch.Generator, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `batch_size` random windows of `seq_len` targets and their inputs, each opening with BOS.

    The generator is the only source of randomness: the same generator state gives the
    same batches, so a saved state is a saved position in the data stream.

    Returns:
        x, y: int64 tensors of shape (batch_size, seq_len); x[:, 0] is BOS and x[:, t + 1] == y[:, t].
    """
    ix = torch.randint(len(data) - seq_len + 1, (batch_size,), generator=generator).numpy()
    rows = ix[:, None] + np.arange(seq_len)  # (batch_size, seq_len)
    y = torch.from_numpy(data[rows])
    x = inputs_for(y, bos_id)
    if device != "cpu":
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x, y


def plot_figures(text: str, tokenizer: CharTokenizer, fig_dir: Path) -> list[Path]:
    """Character frequencies, and one line of Shakespeare as the ids the model sees."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    counts = Counter(text)
    chars = sorted(counts, key=counts.get, reverse=True)
    fig, ax = plt.subplots(figsize=(13, 3.8))
    ax.bar(range(len(chars)), [counts[c] for c in chars], color="tab:blue")
    ax.set_xticks(range(len(chars)), [VISIBLE.get(c, repr(c)[1:-1]) for c in chars], fontsize=8, family="monospace")
    ax.set_xlim(-0.7, len(chars) - 0.3)
    ax.set_yscale("log")
    ax.set(title=f"Character frequencies in the corpus ({len(text):,} characters, {len(chars)} distinct)",
           xlabel="character, most frequent first (␣ = space, \\n = newline)", ylabel="count (log scale)")
    fig.tight_layout()
    freq_path = fig_dir / "01_char_frequencies.png"
    fig.savefig(freq_path, dpi=90)
    plt.close(fig)

    line = text[:24]  # the opening characters, a newline included
    ids = tokenizer.encode(line)
    fig, ax = plt.subplots(figsize=(12, 2.0))
    ax.imshow(np.array(ids)[None, :], cmap="viridis", aspect="auto", vmin=0, vmax=tokenizer.vocab_size,
              alpha=0.45)  # colour by id, light enough to read the text on
    for i, (c, t) in enumerate(zip(line, ids, strict=True)):
        ax.text(i, -0.15, VISIBLE.get(c, c), ha="center", va="center", fontsize=13, family="monospace")
        ax.text(i, 0.22, str(t), ha="center", va="center", fontsize=10, color="dimgray")
    ax.set(title="The opening of the corpus as token ids (character above, its id below)",
           xlabel="position in the sequence")
    ax.set_xticks(range(len(ids)))
    ax.set_yticks([])
    fig.tight_layout()
    ids_path = fig_dir / "01_token_ids.png"
    fig.savefig(ids_path, dpi=90)
    plt.close(fig)
    return [freq_path, ids_path]


def main() -> None:
    parser = argparse.ArgumentParser(description="Chapter 1 demo: tokenizer, split and batches.")
    parser.add_argument("--data", default=None, help="UTF-8 text file (default: data/tinyshakespeare.txt)")
    parser.add_argument("--fig-dir", type=Path, default=Path("out/figures"), help="where figures go")
    args = parser.parse_args()
    try:
        text = load_text(args.data)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")

    tokenizer = CharTokenizer.from_text(text)
    print(f"corpus: {len(text):,} characters, vocab_size {tokenizer.vocab_size} "
          f"({len(tokenizer.chars)} characters + {len(SPECIAL_TOKENS)} special tokens)")
    sample = text[:20]
    ids = tokenizer.encode(sample, bos=True)
    print(f"encode({sample!r}, bos=True) = {ids}")
    print(f"decode(encode(text)) == text: {tokenizer.decode(ids[1:]) == sample} (should be True)")

    data = np.array(tokenizer.encode(text), dtype=np.int64)
    train, val = train_val_split(data)
    print(f"train {len(train):,} tokens, val {len(val):,} tokens ({len(val) / len(data):.0%} held out)")
    x, y = get_batch(train, batch_size=2, seq_len=8, bos_id=tokenizer.bos_id,
                     generator=torch.Generator().manual_seed(0))
    print(f"one window of x {tuple(x.shape)} and y {tuple(y.shape)}: at each position the model reads x[t] "
          f"and must predict y[t], which is x[t + 1]")
    shown = ["BOS" if i == tokenizer.bos_id else VISIBLE.get(tokenizer.itos[i], tokenizer.itos[i])
             for i in x[0].tolist()]
    targets = [VISIBLE.get(c, c) for c in tokenizer.decode(y[0].tolist())]
    print("  t  " + "".join(f"{t:>5}" for t in range(len(shown))))
    print("  x  " + "".join(f"{c:>5}" for c in shown))
    print("  y  " + "".join(f"{c:>5}" for c in targets))
    shifted = torch.equal(x[:, 1:], y[:, :-1]) and bool((x[:, 0] == tokenizer.bos_id).all())
    print(f"x[t + 1] == y[t] for every t, and x[0] is BOS: {shifted} (should be True)")
    for path in plot_figures(text, tokenizer, args.fig_dir):
        print(f"figure: {path}")
    print("caption: the corpus is mostly lower-case letters and spaces; each character becomes one id.")


if __name__ == "__main__":
    main()
