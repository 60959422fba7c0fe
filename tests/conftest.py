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
