"""Chapter 5's command line, kept out of the chapter: its flags and help (the generation flags, which chapter 7
shares), the user's turns read from stdin, and the answers printed as they come, with the speed.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from plumbing.validators import context_length, non_negative_int, seed_type, temperature_type, top_p_type


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Chapter 5: Meta's Llama 3 with the code of chapters 1-4 and main.py. "
                                "Without --llama-dir: a demo on a tiny random model.")
    p.add_argument("--llama-dir", type=Path, default=None, metavar="DIR",
                   help="a Llama 3 checkpoint: Meta's layout (params.json, consolidated.00.pth, tokenizer.model) or "
                        "Hugging Face's (config.json, model*.safetensors, tokenizer.model or tokenizer.json)")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="text to continue (default: 'The capital of France is'); with --chat, one user turn "
                        "(default: one turn per line of stdin)")
    p.add_argument("--chat", action="store_true", help="talk in Llama 3's chat format (Instruct models)")
    p.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message before the first turn")
    add_generation_flags(p)
    p.add_argument("--llama-tokenizer", type=Path, default=None, metavar="PATH",
                   help="demo: Meta's tokenizer.model (default: llama-models' copy, if installed)")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt",
                   metavar="PATH",
                   help="demo: a text to count in BPE tokens, if the file exists (default: data/tinyshakespeare.txt)")
    p.add_argument("--fig-dir", type=Path, default=Path("out/figures"), metavar="DIR",
                   help="demo: where the figure goes (default: %(default)s)")
    return p


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    """The flags of generation from a Llama 3 checkpoint that chapters 5 and 7 share."""
    p.add_argument("--max-new-tokens", type=non_negative_int, default=256, metavar="N",
                   help="tokens to generate at most per answer (default: %(default)s)")
    p.add_argument("--temperature", type=temperature_type, default=0.6, metavar="T",
                   help="sampling temperature; 0 = greedy (default: %(default)s, as in Meta's examples)")
    p.add_argument("--top-p", type=top_p_type, default=0.9, metavar="P",
                   help="nucleus sampling: keep the most likely tokens whose probability adds up to p "
                        "(default: %(default)s)")
    p.add_argument("--seq-len", type=context_length, default=2048, metavar="N",
                   help="the context in tokens, which sizes the KV cache (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="the weights' dtype (default: the checkpoint's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks cuda, then mps, then cpu (default: %(default)s)")
    p.add_argument("--seed", type=seed_type, default=0, metavar="N",
                   help="random seed for sampling (default: %(default)s)")


def print_tokens(tokenizer, tokens: Iterator[int]) -> int:
    """Print the text of `tokens` as they come (stop tokens left out), then end the line; return their number.
    A character whose bytes are split over two tokens is printed once its last byte has come."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    n = 0
    try:
        for token in tokens:
            n += 1
            if token not in tokenizer.stop_ids:
                print(utf8.decode(tokenizer.token_bytes(token)), end="", flush=True)
    finally:
        print(utf8.decode(b"", final=True), flush=True)
    return n


def read_user_turns() -> Iterator[str]:
    """One user turn per line of stdin until its end or "/exit". On a terminal a "> " prompt asks for it;
    otherwise the line is echoed after "> ", so the transcript reads the same."""
    interactive = sys.stdin.isatty()
    while True:
        print("> " if interactive else "", end="", flush=True)
        line = sys.stdin.readline()
        message = line.removesuffix("\n")
        if not line or message == "/exit":
            if interactive and not line:  # Ctrl-D after the "> " prompt: end its line
                print()
            return
        if not interactive:
            print(f"> {message}")
        yield message


def talk(conversation, args: argparse.Namespace) -> None:
    """--llama-dir DIR: continue --prompt, or answer it (--chat), or converse on stdin (--chat alone), printing each
    answer as it comes, then the speed. conversation: chapter 5's Conversation."""
    tokenizer = conversation.tokenizer
    if args.chat:
        if args.prompt is not None:
            print(f"> {args.prompt}")
        turns = [args.prompt] if args.prompt is not None else read_user_turns()
    else:
        turns = [args.prompt if args.prompt is not None else "The capital of France is"]
    n_new, seconds = 0, 0.0
    for message in turns:
        t0 = time.perf_counter()
        if args.chat:
            n_new += print_tokens(tokenizer, conversation.reply(message, args.max_new_tokens))
        else:
            print(message, end="")
            n_new += print_tokens(tokenizer, conversation.generate(tokenizer.encode(message, bos=True),
                                                                   args.max_new_tokens))
        seconds += time.perf_counter() - t0
    print(f"{n_new} new tokens in {seconds:.1f} s ({n_new / max(seconds, 1e-9):.1f} tokens/s); "
          f"{conversation.pos} tokens in the KV cache", file=sys.stderr)
