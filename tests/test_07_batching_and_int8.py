"""Chapter 7: batched generation against one prompt at a time, int8 against its rounding bound, the int8 directory,
and the command line's answers and errors. Every checkpoint is a tiny random one that the tests write."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import cli_error
from safetensors.torch import load_file, save_file

import main
from plumbing import llama_fixtures, runtime

llama = importlib.import_module("05_llama3_tokenizer_and_weights")
serving = importlib.import_module("07_batching_and_int8")
SILENT = lambda line: None  # noqa: E731 (the loaders' log)
PROMPT_LENGTHS = (1, 5, 17, 40)


def write_tiny(path: Path, tied: bool) -> Path:
    """A tiny random Llama 3 (dim 64, vocab 512: the byte tokenizer) in Meta's layout, float32."""
    weights = llama_fixtures.random_llama(llama_fixtures.TINY_PARAMS, std=0.15)
    if not tied:
        generator = torch.Generator().manual_seed(1)
        weights["output.weight"] = torch.randn(weights["output.weight"].shape, generator=generator) * 0.15
    return llama_fixtures.write_meta_layout(path, weights, llama_fixtures.TINY_PARAMS, llama_fixtures.BYTE_TOKENIZER)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {"tied": write_tiny(root / "tied", tied=True), "untied": write_tiny(root / "untied", tied=False)}


@pytest.fixture(scope="module")
def int8_dirs(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """Each tiny checkpoint quantized and saved once, by the command line."""
    root = tmp_path_factory.mktemp("int8")
    for name, path in tiny_dirs.items():
        serving.main(["--llama-dir", str(path), "--save-int8", str(root / name)])
    return {name: root / name for name in tiny_dirs}


def load(path: Path, max_seq_len: int = 96) -> main.Transformer:
    return llama.load_llama(path, max_seq_len, log=SILENT)[0]


def prompts_of(lengths: tuple[int, ...] = PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


# ----------------------------------------------------------------------------- batched generation


@pytest.mark.parametrize("quantized", [False, True])
def test_batched_greedy_equals_each_prompt_generated_alone(tiny_dirs, quantized):
    model = load(tiny_dirs["tied"])  # load_llama builds its KV cache for one row
    if quantized:
        serving.quantize_int8(model)
    prompts = prompts_of()
    batched = serving.generate_batch(model, prompts, 12, set(), temperature=0)
    alone = [list(main.generate_tokens(model, prompt, 12, set(), temperature=0)) for prompt in prompts]
    assert [len(a) for a in batched] == [12] * 4
    assert batched == alone
    # generate_batch sized the KV cache for its batch of 4, then gave the model back its own, of one row
    assert {(layer.attention.max_batch_size, layer.attention.max_seq_len) for layer in model.layers} == {(1, 96)}


def test_each_row_stops_at_its_own_stop_token_and_leaves_the_others_unchanged(tiny_dirs):
    model = load(tiny_dirs["tied"])
    prompts = prompts_of()
    full = serving.generate_batch(model, prompts, 16, set(), temperature=0)
    stop = {full[1][3], full[2][8]}  # ends row 1 after 3 tokens, row 2 after at most 8; the others maybe later
    cut = serving.generate_batch(model, prompts, 16, stop, temperature=0)
    alone = [list(main.generate_tokens(model, prompt, 16, stop, temperature=0)) for prompt in prompts]
    assert cut == alone
    assert len(cut[1]) == 3 and len(cut[2]) <= 8
    for answer, uncut in zip(cut, full, strict=True):  # each answer is its uncut answer up to its first stop
        assert answer == uncut[: len(answer)] and all(token not in stop for token in answer)


def test_finished_rows_leave_the_batch(tiny_dirs, monkeypatch):
    model = load(tiny_dirs["tied"])
    rows, onednn = [], []
    forward = main.Transformer.forward
    monkeypatch.setattr(main.Transformer, "forward", lambda self, tokens, *args, **kwargs: (
        rows.append(tokens.shape[0]), onednn.append(torch.backends.mkldnn.enabled),
        forward(self, tokens, *args, **kwargs))[2])
    serving.generate_batch(model, prompts_of((2, 2, 6)), 3, set(), temperature=0)
    # positions 0-1 of all three, then 2, 3 and 4, where the short rows have their third token; then the long row
    assert rows == [3, 3, 3, 1, 1, 1, 1]
    # oneDNN's matrix kernel for several rows; PyTorch's matrix-vector kernel for one token (chapter 5)
    assert onednn == [n > 1 for n in rows] and torch.backends.mkldnn.enabled


def test_sampling_is_reproducible_for_a_generator(tiny_dirs):
    model = load(tiny_dirs["tied"])
    prompts = prompts_of()

    def sample(seed: int) -> list[list[int]]:
        return serving.generate_batch(model, prompts, 10, set(), temperature=1.0, top_p=0.95,
                                      generator=torch.Generator().manual_seed(seed))

    first = sample(0)
    torch.manual_seed(123)  # the global stream must not matter
    assert sample(0) == first
    assert sample(1) != first


def test_bad_arguments_are_errors(tiny_dirs):
    model = load(tiny_dirs["tied"], max_seq_len=32)
    with pytest.raises(ValueError, match="at least one prompt"):
        serving.generate_batch(model, [[1], []], 4, set())
    with pytest.raises(ValueError, match="do not fit in the context"):
        serving.generate_batch(model, [[1] * 30], 3, set())
    assert serving.generate_batch(model, [[1], [2, 3]], 0, set()) == [[], []]


def test_bfloat16_rows_run_in_float32_blocks_on_a_cpu_without_bfloat16(monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 1200, bias=False).to(torch.bfloat16)  # blocks of 512, 512 and 176 rows
    x = torch.randn(2, 4, 64).to(torch.bfloat16)
    expected = (x.float() @ linear.weight.float().T).to(torch.bfloat16)  # (2, 4, 1200)
    in_blocks = runtime.bfloat16_linear_in_blocks
    torch.testing.assert_close(in_blocks(x, linear.weight, torch.empty(512, 64)), expected, rtol=2**-8, atol=0)
    calls = []
    monkeypatch.setattr(runtime, "bfloat16_linear_in_blocks", lambda *args: calls.append(args[0].shape) or
                        in_blocks(*args))
    for has_bfloat16, rows in [(False, 8), (False, 4), (True, 8)]:
        monkeypatch.setattr(runtime, "onednn_has_bfloat16", lambda has=has_bfloat16: has)
        with runtime.cpu_batch_kernels(rows):
            linear(x.view(rows, -1, 64))
    assert calls == [(8, 1, 64)]  # 8 rows or more, on a CPU without bfloat16: only there
    monkeypatch.setattr(runtime, "onednn_has_bfloat16", lambda: False)
    with runtime.cpu_batch_kernels(8):  # weights elsewhere than the CPU (a GPU; here the meta device) are left alone
        linear.to("meta")(x.view(8, -1, 64).to("meta"))
    assert calls == [(8, 1, 64)]


# ----------------------------------------------------------------------------- int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_within_its_rounding_bound_of_linear(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=False).to(dtype)
    with torch.no_grad():
        linear.weight[3] *= 30  # a row of large weights: its own scale, the others keep theirs
    int8 = serving.Int8Linear.quantize(linear)
    w, q, s = linear.weight.detach().double(), int8.weight.double(), int8.scale.double()
    assert int8.weight.dtype == torch.int8 and int8.scale.dtype == dtype
    assert ((w - q * s[:, None]).abs() <= s[:, None] / 2).all()  # each weight: at most half a step
    assert (s[[0, 1, 2]] < s[3] / 10).all()
    x = torch.randn(3, 7, 96).to(dtype)
    y, reference = int8(x), linear(x)
    assert y.shape == reference.shape and y.dtype == dtype
    bound = x.double().abs() @ (s / 2)[None, :].expand(96, 40)  # sum_j |x_j| s_i / 2
    rounding = reference.double().abs() * (2**-7 if dtype == torch.bfloat16 else 1e-5) + 1e-6  # of the result
    assert ((y.double() - reference.double()).abs() <= bound + rounding).all()
    assert ((y.double() - x.double() @ (q * s[:, None]).T).abs() <= rounding).all()  # = the dequantized layer


def test_int8_linear_reads_an_input_that_is_not_16_byte_aligned():
    torch.manual_seed(0)
    int8 = serving.Int8Linear.quantize(torch.nn.Linear(64, 16, bias=False).to(torch.bfloat16))
    storage = torch.randn(2 * 64 + 1).to(torch.bfloat16)
    x = storage[1:].view(2, 64)  # 2 bytes past an aligned address: PyTorch's kernel would crash on it
    assert x.data_ptr() % 16
    assert torch.equal(int8(x), int8(x.clone()))


def test_int8_linear_refuses_rows_that_are_not_a_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        serving.Int8Linear.quantize(torch.nn.Linear(36, 8, bias=False))


def test_quantize_int8_keeps_the_tie_and_replaces_every_matrix(tiny_dirs):
    model = serving.quantize_int8(load(tiny_dirs["tied"]))
    assert model.output.weight is model.tok_embeddings.weight and model.output.scale is model.tok_embeddings.scale
    int8 = [name for name, m in model.named_modules() if isinstance(m, serving.Int8Linear)]
    assert len(int8) == 7 * llama_fixtures.TINY_PARAMS["n_layers"] + 1 and "output" in int8
    assert [name for name, _ in model.named_parameters()] == [  # only the norms are left in float
        name for name, _ in load(tiny_dirs["tied"]).named_parameters() if "norm" in name]
    tokens = torch.tensor([prompts_of((24,))[0]])
    reference = load(tiny_dirs["tied"])
    assert torch.equal(model.tok_embeddings(tokens),
                       F.embedding(tokens, model.output.weight.float() * model.output.scale[:, None]))
    with torch.no_grad():
        logits, expected = model(tokens)[0], reference(tokens)[0]
    assert (logits - expected).abs().max() < 0.1 * expected.abs().max()
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_an_untied_embedding_stays_in_float(tiny_dirs):
    model = serving.quantize_int8(load(tiny_dirs["untied"]))
    assert isinstance(model.tok_embeddings, torch.nn.Embedding) and isinstance(model.output, serving.Int8Linear)


# ----------------------------------------------------------------------------- the int8 directory


@pytest.mark.parametrize("case", ["tied", "untied"])
def test_a_saved_int8_directory_gives_the_logits_of_quantizing_on_the_fly(tiny_dirs, int8_dirs, case):
    saved = load_file(int8_dirs[case] / serving.INT8_WEIGHTS)
    assert ("output.weight" in saved) == (case == "untied")  # a tied output is stored once
    assert saved["layers.0.attention.wq.weight"].dtype == torch.int8
    model, tokenizer = serving.load_int8(int8_dirs[case], 64, log=SILENT)
    assert tokenizer.vocab_size == 512
    assert model.params.rope_scaling_factor == load(tiny_dirs[case]).params.rope_scaling_factor
    assert (model.output.weight is model.tok_embeddings.weight) == (case == "tied")
    on_the_fly = serving.quantize_int8(load(tiny_dirs[case]))
    tokens = torch.tensor(prompts_of((2, 2), seed=3))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], on_the_fly(tokens)[0])


# ----------------------------------------------------------------------------- the command line


def run_cli(capsys, *flags) -> list[str]:
    serving.main([str(f) for f in flags])
    return capsys.readouterr().out.splitlines()


def test_cli_answers_every_prompt_in_order_whatever_the_batch_size(tiny_dirs, int8_dirs, tmp_path, capsys):
    prompts = ["ROMEO:", "", "O", "But soft, what light through yonder window breaks?", "Juliet is the sun."]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    flags = ["--prompts", tmp_path / "prompts.txt", "--temperature", "0", "--max-new-tokens", "6", "--seq-len", "64"]
    one_at_a_time = run_cli(capsys, "--llama-dir", tiny_dirs["tied"], *flags, "--batch-size", "1")
    assert [line.split("]")[0] for line in one_at_a_time if line.startswith("[")] == ["[1", "[2", "[3", "[4"]
    assert run_cli(capsys, "--llama-dir", tiny_dirs["tied"], *flags, "--batch-size", "3") == one_at_a_time
    # int8: the saved directory answers as quantizing on the fly does
    saved = run_cli(capsys, "--llama-dir", int8_dirs["tied"], *flags, "--batch-size", "4")
    assert run_cli(capsys, "--llama-dir", tiny_dirs["tied"], *flags, "--int8") == saved


def test_cli_errors_are_one_line(tiny_dirs, int8_dirs, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "holds no prompt" in cli_error(["--llama-dir", tiny_dirs["tied"], "--prompts", tmp_path / "empty.txt"],
                                          serving.main)
    assert "not an empty directory" in cli_error(["--llama-dir", tiny_dirs["tied"], "--save-int8", int8_dirs["tied"]],
                                                 serving.main)
    assert "int8 directory already" in cli_error(["--llama-dir", int8_dirs["tied"], "--dtype", "float32"],
                                                  serving.main)
    with pytest.raises(SystemExit) as exit_info:
        serving.main(["--llama-dir", str(tiny_dirs["tied"]), "--batch-size", "0"])
    assert exit_info.value.code == 2 and "argument --batch-size: must be a positive integer" in capsys.readouterr().err


def corrupt(int8_dir: Path, tmp_path: Path, change) -> Path:
    """A copy of an int8 directory whose tensors `change` (a function of the state dict) altered."""
    path = tmp_path / "corrupt"
    shutil.copytree(int8_dir, path)
    tensors = load_file(path / serving.INT8_WEIGHTS)
    change(tensors)
    save_file(tensors, path / serving.INT8_WEIGHTS, metadata={"rope_scaling_factor": "32.0"})
    return path


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.pop("layers.1.feed_forward.w2.scale"), "missing layers.1.feed_forward.w2.scale"),
    (lambda t: t.update({"layers.0.attention.wq.weight": t["layers.0.attention.wq.weight"][:8]}), "has shape (8, 64)"),
    (lambda t: t.update({"layers.0.attention.wk.weight": t["layers.0.attention.wk.weight"].float()}),
     "layers.0.attention.wk.weight is torch.float32, not torch.int8"),
    (lambda t: t.update({"norm.weight": t["norm.weight"].to(torch.bfloat16)}), "is torch.float32, not torch.bfloat16"),
])
def test_a_corrupt_int8_directory_is_one_error_line(int8_dirs, tmp_path, change, message, capsys):
    path = corrupt(int8_dirs["tied"], tmp_path, change)
    assert message in cli_error(["--llama-dir", path, "--max-new-tokens", "1"], serving.main)


def test_a_truncated_or_foreign_int8_directory_is_one_error_line(int8_dirs, tmp_path):
    path = tmp_path / "truncated"
    shutil.copytree(int8_dirs["tied"], path)
    data = (path / serving.INT8_WEIGHTS).read_bytes()
    (path / serving.INT8_WEIGHTS).write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in cli_error(["--llama-dir", path], serving.main)
    foreign = tmp_path / "foreign"
    shutil.copytree(int8_dirs["tied"], foreign)
    save_file(load_file(foreign / serving.INT8_WEIGHTS), foreign / serving.INT8_WEIGHTS)  # no metadata
    assert "was not written by save_int8" in cli_error(["--llama-dir", foreign], serving.main)
    wider = tmp_path / "wider"
    shutil.copytree(int8_dirs["tied"], wider)
    params = json.loads((wider / "params.json").read_text())
    (wider / "params.json").write_text(json.dumps({**params, "dim": 128}))
    assert "but its params.json or config.json needs (64,)" in cli_error(["--llama-dir", wider], serving.main)
