import gzip
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The project's real data (../shared/data relative to the repository root); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """`shared_data` for module- and session-scoped fixtures (trained models shared by several tests)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bibtex(shared_data_dir) -> Path:
    """The Bibtex dataset (XC format, train and test splits, no dev split)."""
    return shared_data_dir / "xc" / "bibtex"


@pytest.fixture
def one_torch_thread():
    """torch at one intra-op thread for the test (the shared machine's cores are few), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 1-layer BERT (hidden 32) with the MiniLM tokenizer, saved as a local Hugging Face directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from elias_retrieval.encoders import default_transformer_path

    d = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(default_transformer_path(), local_files_only=True)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     vocab_size=tok.vocab_size, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def eurlex_small(shared_data_dir, tmp_path_factory) -> Path:
    """A 300 / 100 / 100 train / dev / test dataset cut from the first EURLEX57K dev documents."""
    d = tmp_path_factory.mktemp("eurlex-small")
    with gzip.open(shared_data_dir / "eurlex57k" / "dev.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [next(f) for _ in range(500)]
    for name, part in (("train", rows[:300]), ("dev", rows[300:400]), ("test", rows[400:])):
        (d / f"{name}.jsonl").write_text("".join(part), encoding="utf-8")
    return d
