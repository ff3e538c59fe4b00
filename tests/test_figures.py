"""docs/make_figures.py, the README's one command for its figures, on a tiny corpus and model."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPECTED = ["01_char_frequencies.png", "01_token_ids.png", "02_rope.png", "02_rmsnorm.png", "02_rope_scaling.png",
            "03_attention_heads.png", "03_kv_cache.png", "04_activations.png", "04_block_parameters.png",
            "05_llama3_weights.png", "06_lora.png", "07_batching_and_int8.png", "main_loss.png", "main_attention.png"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_make_figures_writes_every_png(tmp_path: Path, tiny_corpus: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_figures", REPO / "docs" / "make_figures.py")
    make_figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_figures)

    fig_dir = tmp_path / "figures"
    make_figures.main(["--data", str(tiny_corpus), "--fig-dir", str(fig_dir), "--max-iters", "2",
                       "--dim", "16", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1", "--seq-len", "32",
                       "--batch-size", "4", "--eval-iters", "1", "--max-new-tokens", "0", "--device", "cpu"])

    assert sorted(p.name for p in fig_dir.iterdir()) == sorted(EXPECTED)
    for name in EXPECTED:
        data = (fig_dir / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name


def test_readme_figures_are_committed_and_small() -> None:
    for name in EXPECTED:
        path = REPO / "docs" / "figures" / name
        assert path.read_bytes().startswith(PNG_SIGNATURE), name
        assert path.stat().st_size < 400 * 1024, f"{name} is {path.stat().st_size:,} bytes"
