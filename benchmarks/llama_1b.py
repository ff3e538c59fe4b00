"""What the Llama benchmarks share: the checkpoint shapes they write (and the writing), a process's peak memory,
and running one measurement in a fresh process."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from plumbing import llama_fixtures  # noqa: E402

llama = importlib.import_module("05_llama3_tokenizer_and_weights")

SHAPES = {  # params.json of Llama 3.2 1B, and a tiny model with the same vocabulary for a smoke test
    "1b": llama_fixtures.LLAMA_32_PARAMS["1B"],
    "tiny": {**llama_fixtures.LLAMA_32_PARAMS["1B"], "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
             "multiple_of": 16, "ffn_dim_multiplier": None},
}


def write_random_llama(path: Path, shape: str, tokenizer: Path) -> int:
    """Random bfloat16 weights with exactly the shape's names and sizes, as Meta ships them (path/meta: params.json,
    consolidated.00.pth with output.weight the same tensor as tok_embeddings.weight) and as Hugging Face's
    conversion makes them (path/hf). Returns the number of parameters (the tied matrix once)."""
    params, tokenizer_model = SHAPES[shape], tokenizer.read_text()
    weights = llama_fixtures.random_llama(params, std=0.02, dtype=torch.bfloat16)
    model_args = llama.ModelArgs(**params)
    llama_fixtures.write_meta_layout(path / "meta", weights, params, tokenizer_model)
    llama_fixtures.write_hf_layout(path / "hf", llama.hf_state_dict(weights, model_args), params,
                                   llama.meta_rope_scaling_factor(model_args), tokenizer_model)
    return sum(t.numel() for name, t in weights.items() if name != "output.weight")


def random_checkpoint(path: Path, shape: str, tokenizer: Path | None) -> None:
    """write_random_llama into `path`, unless path/meta holds a checkpoint already (a benchmark's --dir reuses it).
    tokenizer: Meta's tokenizer.model (None: llama-models' copy); without one, exit with one error line."""
    if (path / "meta" / "consolidated.00.pth").is_file():
        return
    tokenizer = tokenizer or llama_fixtures.packaged_llama3_tokenizer()
    if tokenizer is None or not tokenizer.is_file():
        sys.exit("error: no tokenizer.model: pip install -r requirements-test.txt, or pass --tokenizer PATH")
    t0 = time.perf_counter()
    n_params = write_random_llama(path, shape, tokenizer)
    print(f"wrote a random {shape} checkpoint ({n_params:,} parameters) in Meta's and Hugging Face's layouts to "
          f"{path} in {time.perf_counter() - t0:.0f} s", flush=True)


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux: VmHWM, which, unlike getrusage's ru_maxrss,
    does not inherit the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status (this benchmark measures memory on Linux only)")


def measure_in_child(command: list[str], what: str, env: dict | None = None) -> dict:
    """Run `python *command` in a fresh process (its own peak memory, no caches warmed by another measurement) and
    return the JSON object it prints last. A failure ends the benchmark with the child's error output."""
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"error: measuring {what} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])
