"""The index format: round trip, memory mapping, every refusal, atomic writes, compact dtypes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from elias_retrieval import index_format as fmt
from elias_retrieval.data import LabelVocab
from elias_retrieval.index_format import IndexFormatError, is_index_dir, read_index, verify_index, write_index
from elias_retrieval.label_layout import home_clusters
from elias_retrieval.search import SearchTensors, search
from elias_retrieval.synthetic import synthetic_queries, synthetic_tensors

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {"k": 10, "beam_size": 8, "shortlist_size": 400}


def vocab(n: int) -> LabelVocab:
    return LabelVocab([f"label-{i}" for i in range(n)], [None] * (n - 1) + ["the last label"])


def build(path: Path, t: SearchTensors, dtype: str = "fp32", **kw) -> Path:
    write_index(path, t, vocab(t.num_labels), None, dtype=dtype, defaults=DEFAULTS, meta={"num_train": 7}, **kw)
    return path


@pytest.fixture(scope="module")
def small() -> SearchTensors:
    return synthetic_tensors(3000, dim=32, kappa=150, seed=3, dtype="fp32")


@pytest.fixture()
def index_dir(tmp_path: Path, small: SearchTensors) -> Path:
    return build(tmp_path / "idx", small, train_label_counts=torch.arange(small.num_labels))


def test_round_trip_gives_back_the_tensors_labels_and_manifest(index_dir: Path, small: SearchTensors):
    assert is_index_dir(index_dir)
    ix = read_index(index_dir, verify=True)
    t = ix.tensors
    for name in ("W_C", "b_C", "A_weights"):
        assert torch.equal(getattr(t, name), getattr(small, name)), name
    # Label rows are stored in cluster order: row r holds label row_labels[r]; A holds rows.
    labels = t.row_labels.long()
    assert ix.manifest["label_order"] == "clusters" and t.row_labels.dtype == torch.int32
    assert torch.equal(torch.sort(labels).values, torch.arange(small.num_labels))
    assert not torch.equal(labels, torch.arange(small.num_labels))  # synthetic labels sit in shuffled clusters
    assert torch.equal(t.W_L, small.W_L[labels]) and torch.equal(t.b_L, small.b_L[labels])
    assert t.A_ids.dtype == torch.int32
    assert torch.equal(torch.cat([labels, torch.tensor([small.num_labels])])[t.A_ids.long()], small.A_ids)
    home = home_clusters(t.A_ids, t.A_weights, small.num_labels)
    assert bool((home[1:] >= home[:-1]).all())
    assert t.alpha == small.alpha and t.W_L_scale is None
    assert torch.equal(ix.train_label_counts, torch.arange(small.num_labels))
    assert ix.labels.ids[:2] == ["label-0", "label-1"] and ix.labels.names[-1] == "the last label"
    assert ix.labels.names[0] is None and len(ix.labels) == small.num_labels
    assert ix.defaults == DEFAULTS and ix.manifest["num_train"] == 7
    assert ix.manifest["format"] == fmt.FORMAT_NAME and ix.manifest["version"] == fmt.FORMAT_VERSION
    assert ix.load_encoder() is None
    q, _ = synthetic_queries(small, 20)
    a, b = search(q, small, k=10, beam_size=8), search(q, t, k=10, beam_size=8)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)


def test_tensor_file_is_plain_safetensors(index_dir: Path, small: SearchTensors):
    loaded = load_file(str(index_dir / fmt.TENSORS))
    assert torch.equal(loaded["W_L"], small.W_L[loaded["row_labels"].long()])
    assert torch.equal(loaded["A_weights"], small.A_weights)


def test_read_index_maps_the_file_without_copying(tmp_path: Path):
    t = synthetic_tensors(100_000, dim=256, kappa=200, dtype="fp16")  # W_L: 51 MB
    build(tmp_path / "big", t, "fp16")
    del t
    proc = psutil.Process()
    before = proc.memory_info().rss
    ix = read_index(tmp_path / "big")
    grown = proc.memory_info().rss - before
    assert grown < 8 << 20, f"RSS grew {grown / 2**20:.1f} MiB on load"
    # Writing to a mapped tensor never reaches the file (copy-on-write mapping).
    ix.tensors.W_L[0] = 0
    verify_index(tmp_path / "big")


def test_no_pickle_on_the_load_path(index_dir: Path, monkeypatch: pytest.MonkeyPatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("pickle used on the load path")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    ix = read_index(index_dir, verify=True)
    search(torch.randn(2, ix.tensors.dim), ix.tensors, k=5)
    assert len(ix.labels) == ix.tensors.num_labels


@pytest.mark.parametrize("dtype,min_overlap", [("fp16", 0.99), ("int8", 0.95)])
def test_compact_label_weights_agree_with_fp32(tmp_path: Path, dtype: str, min_overlap: float):
    t = synthetic_tensors(20_000, dim=64, kappa=400, seed=1, noise=1.0, dtype="fp32")
    ix = read_index(build(tmp_path / dtype, t, dtype))
    assert ix.tensors.W_L.dtype == fmt.LABEL_DTYPES[dtype]
    assert (ix.tensors.W_L_scale is not None) == (dtype == "int8")
    q, _ = synthetic_queries(t, 200, seed=2, noise=1.0)
    ref, got = (search(q, x, k=10, beam_size=16, shortlist_size=400) for x in (t, ix.tensors))
    pairs = zip(ref.ids.tolist(), got.ids.tolist(), strict=True)
    overlap = sum(len(set(a) & set(b)) for a, b in pairs) / ref.ids.numel()
    print(f"{dtype} vs fp32: top-10 overlap {overlap:.4f}")
    assert overlap >= min_overlap


def test_int8_quantisation_error_is_within_half_a_step():
    W = torch.randn(50, 16)
    W[3] = 0
    q, s = fmt.quantize_int8(W)
    assert q.dtype == torch.int8 and s[3] == 1
    assert ((q.float() * s[:, None] - W).abs() <= s[:, None] / 2 + 1e-7).all()


# ----- refusals: each names the file and the problem


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel", [fmt.TENSORS, fmt.LABELS])
def test_flipped_byte_is_refused_by_verify(index_dir: Path, rel: str):
    f = index_dir / rel
    flip_byte(f, f.stat().st_size - 3)
    read_index(index_dir)  # sizes and header still fine: a plain load does not hash
    with pytest.raises(IndexFormatError, match=f"{rel}: sha256 mismatch"):
        verify_index(index_dir)
    with pytest.raises(IndexFormatError, match="sha256 mismatch"):
        read_index(index_dir, verify=True)


def test_truncated_file_is_refused_at_load(index_dir: Path):
    f = index_dir / fmt.TENSORS
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    with pytest.raises(IndexFormatError, match=r"tensors\.safetensors: \d+ bytes, manifest.json says \d+ \(truncated"):
        read_index(index_dir)


@pytest.mark.parametrize("rel", [fmt.TENSORS, fmt.LABELS])
def test_missing_file_is_refused_at_load(index_dir: Path, rel: str):
    (index_dir / rel).unlink()
    with pytest.raises(IndexFormatError, match=f"{rel}: missing"):
        read_index(index_dir)


def test_missing_manifest_is_refused(index_dir: Path):
    (index_dir / fmt.MANIFEST).unlink()
    assert not is_index_dir(index_dir)
    with pytest.raises(IndexFormatError, match="manifest.json: missing"):
        read_index(index_dir)


def edit_manifest(index_dir: Path, edit) -> None:
    p = index_dir / fmt.MANIFEST
    m = json.loads(p.read_text())
    edit(m)
    p.write_text(json.dumps(m))


def test_unknown_version_is_refused(index_dir: Path):
    edit_manifest(index_dir, lambda m: m.update(version=4))
    with pytest.raises(IndexFormatError, match="manifest.json: unknown format version 4"):
        read_index(index_dir)


def test_other_format_is_refused(index_dir: Path):
    edit_manifest(index_dir, lambda m: m.update(format="something-else"))
    with pytest.raises(IndexFormatError, match="manifest.json: not an elias-index manifest"):
        read_index(index_dir)


def test_shape_disagreeing_with_manifest_is_refused(index_dir: Path):
    edit_manifest(index_dir, lambda m: m["model"].update(num_labels=m["model"]["num_labels"] + 1))
    with pytest.raises(IndexFormatError, match=r"tensors\.safetensors: tensor W_L is \('float32', \[3000, 32\]\)"):
        read_index(index_dir)


def test_corrupt_safetensors_header_is_refused(index_dir: Path):
    f = index_dir / fmt.TENSORS
    flip_byte(f, 9)  # inside the JSON header
    edit_manifest(index_dir, lambda m: None)
    with pytest.raises(IndexFormatError, match=r"tensors\.safetensors: "):
        read_index(index_dir)


def test_pickle_files_are_never_listed_or_written(index_dir: Path, tmp_path: Path, small: SearchTensors):
    edit_manifest(index_dir, lambda m: m["files"].update({"encoder/pytorch_model.bin": {"bytes": 1, "sha256": ""}}))
    with pytest.raises(IndexFormatError, match="refusing listed file 'encoder/pytorch_model.bin'"):
        read_index(index_dir)
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "encoder.json").write_text('{"kind": "transformer"}')
    (enc / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle"):
        write_index(tmp_path / "x", small, vocab(small.num_labels), enc, dtype="fp16", defaults=DEFAULTS, meta={})


def test_bad_labels_file_is_refused_on_first_use(index_dir: Path):
    f = index_dir / fmt.LABELS
    f.write_text(f.read_text().replace('{"id":"label-5"}', '{"id":"label-5"'))
    edit_manifest(index_dir, lambda m: m["files"][fmt.LABELS].update(bytes=f.stat().st_size))
    ix = read_index(index_dir)
    with pytest.raises(IndexFormatError, match=r"labels\.jsonl: line 6 is not valid JSON"):
        ix.labels  # noqa: B018


def test_write_refuses_inconsistent_input(tmp_path: Path, small: SearchTensors):
    with pytest.raises(ValueError, match="dtype"):
        build(tmp_path / "a", small, "bf8")
    with pytest.raises(ValueError, match="labels in the vocabulary"):
        write_index(tmp_path / "b", small, vocab(5), None, dtype="fp16", defaults=DEFAULTS, meta={})
    with pytest.raises(ValueError, match="manifest keys"):
        write_index(tmp_path / "c", small, vocab(small.num_labels), None, dtype="fp16", defaults=DEFAULTS,
                    meta={"version": 9})
    raw = SearchTensors(small.W_C, small.b_C, small.A_ids, small.A_weights * 3, small.W_L, small.b_L, 1.0)
    with pytest.raises(ValueError, match="normalised"):
        build(tmp_path / "d", raw)
    assert not any(p.name != "a" and p.exists() for p in tmp_path.iterdir() if p.name in "bcd")


# ----- atomicity


def test_failed_write_keeps_the_previous_index(index_dir: Path, small: SearchTensors, monkeypatch: pytest.MonkeyPatch):
    before = (index_dir / fmt.MANIFEST).read_text()
    real = fmt._write_hashed

    def crash_after_tensors(path, chunks, advance):
        if path.name == fmt.LABELS:
            raise OSError("disk full (simulated)")
        return real(path, chunks, advance)

    monkeypatch.setattr(fmt, "_write_hashed", crash_after_tensors)
    with pytest.raises(OSError, match="simulated"):
        build(index_dir, small, "int8")
    assert (index_dir / fmt.MANIFEST).read_text() == before
    verify_index(index_dir)
    assert sorted(p.name for p in index_dir.parent.iterdir()) == ["idx"]  # no temporary left behind


def test_killed_write_leaves_the_previous_index_and_nothing_that_loads(index_dir: Path):
    before = (index_dir / fmt.MANIFEST).read_text()
    script = textwrap.dedent(f"""
        import os, signal
        from elias_retrieval import index_format as fmt
        from elias_retrieval.data import LabelVocab
        from elias_retrieval.synthetic import synthetic_tensors
        real = fmt._write_hashed
        def killed_mid_write(path, chunks, advance):
            def gen():
                for i, c in enumerate(chunks):
                    if i == 2:
                        os.kill(os.getpid(), signal.SIGKILL)
                    yield c
            return real(path, gen(), advance)
        fmt._write_hashed = killed_mid_write
        fmt._CHUNK = 4096
        t = synthetic_tensors(3000, dim=32, kappa=150, seed=4)
        fmt.write_index({str(index_dir)!r}, t, LabelVocab([str(i) for i in range(3000)], []), None,
                        dtype="fp16", defaults={DEFAULTS!r}, meta={{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert (index_dir / fmt.MANIFEST).read_text() == before
    verify_index(index_dir)
    leftovers = [p for p in index_dir.parent.iterdir() if p.name != "idx"]
    assert leftovers and all(p.name.startswith(".idx.") for p in leftovers)
    for p in leftovers:  # the half-written temporary has no manifest: it never loads
        assert (p / fmt.TENSORS).exists() and not is_index_dir(p)
        with pytest.raises(IndexFormatError, match="missing"):
            read_index(p)


def test_index_directory_is_readable_by_others(index_dir: Path):
    mode = os.stat(index_dir).st_mode & 0o777
    assert mode == 0o777 & ~_umask()


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


@pytest.mark.parametrize(("dtype", "cluster"),
                         [("fp32", torch.float32), ("fp16", torch.float16), ("int8", torch.float16)])
def test_cluster_weights_are_stored_in_fp16_beside_a_compact_label_storage(tmp_path: Path, small, dtype, cluster):
    out = tmp_path / dtype
    fmt.write_index(out, small, vocab(small.num_labels), None, dtype=dtype, defaults=DEFAULTS, meta={})
    ix = read_index(out)
    assert ix.tensors.W_C.dtype == cluster and ix.manifest["cluster_weights"] == fmt.CLUSTER_DTYPES[dtype]
    torch.testing.assert_close(ix.tensors.W_C.float(), small.W_C.to(cluster).float(), atol=0, rtol=0)


def test_version_1_index_still_opens(tmp_path: Path, small):
    # Version 1 had no cluster_weights key and stored W_C in fp32 always.
    out = tmp_path / "v1"
    fmt.write_index(out, small, vocab(small.num_labels), None, dtype="fp32", defaults=DEFAULTS, meta={},
                    cluster_layout=False)
    edit_manifest(out, lambda m: (m.update(version=1), m.pop("cluster_weights"), m.pop("label_order")))
    ix = read_index(out)
    assert ix.tensors.W_C.dtype == torch.float32 and ix.manifest["cluster_weights"] == "fp32"
    assert ix.tensors.row_labels is None and torch.equal(ix.tensors.W_L, small.W_L)


def _rewrite_row_labels(index_dir: Path, row_labels: torch.Tensor) -> None:
    """Replace the stored row_labels (a valid safetensors file) and re-list the file in the manifest."""
    import hashlib

    from safetensors.torch import save_file

    f = index_dir / fmt.TENSORS
    tensors = {k: v.clone() for k, v in load_file(str(f)).items()}
    tensors["row_labels"] = row_labels.to(torch.int32)
    save_file(tensors, str(f))
    data = f.read_bytes()
    edit_manifest(index_dir, lambda m: m["files"][fmt.TENSORS].update(bytes=len(data),
                                                                      sha256=hashlib.sha256(data).hexdigest()))


def test_row_labels_out_of_range_are_refused_at_load(index_dir: Path, small: SearchTensors):
    rows = read_index(index_dir).tensors.row_labels.clone()
    rows[5] = small.num_labels
    _rewrite_row_labels(index_dir, rows)
    with pytest.raises(IndexFormatError, match=r"tensors\.safetensors: row_labels holds ids outside 0\.\.2999"):
        read_index(index_dir)


def test_row_labels_that_repeat_a_label_are_refused_by_verify(index_dir: Path):
    rows = read_index(index_dir).tensors.row_labels.clone()
    rows[5] = rows[6]
    _rewrite_row_labels(index_dir, rows)
    read_index(index_dir)  # in range: a plain load does not count
    with pytest.raises(IndexFormatError, match="row_labels is not a permutation of 0..2999"):
        verify_index(index_dir)


def test_write_refuses_row_labels_that_are_not_a_permutation(tmp_path: Path, small: SearchTensors):
    rows = torch.arange(small.num_labels)
    rows[0] = 1
    with pytest.raises(ValueError, match="row_labels must be a permutation of 0..2999"):
        build(tmp_path / "x", dataclasses.replace(small, row_labels=rows))
    assert not (tmp_path / "x").exists()


def test_ids_order_stores_row_l_as_label_l(tmp_path: Path, small: SearchTensors):
    ix = read_index(build(tmp_path / "ids", small, cluster_layout=False))
    assert ix.manifest["label_order"] == "ids" and ix.tensors.row_labels is None
    assert torch.equal(ix.tensors.W_L, small.W_L) and torch.equal(ix.tensors.A_ids.long(), small.A_ids)
    # Tensors already in cluster order are written back in label-id order.
    laid = read_index(build(tmp_path / "laid", small)).tensors
    again = read_index(build(tmp_path / "again", laid, cluster_layout=False))
    assert again.tensors.row_labels is None and torch.equal(again.tensors.W_L, small.W_L)
    assert torch.equal(again.tensors.A_ids.long(), small.A_ids)


def test_label_order_and_row_labels_must_agree(index_dir: Path, tmp_path: Path, small: SearchTensors):
    edit_manifest(index_dir, lambda m: m.update(label_order="ids"))
    with pytest.raises(IndexFormatError, match=r"tensors\.safetensors: unexpected tensors \['row_labels'\]"):
        read_index(index_dir)
    ids = build(tmp_path / "ids", small, cluster_layout=False)
    edit_manifest(ids, lambda m: m.update(label_order="clusters"))
    with pytest.raises(IndexFormatError, match=r"tensors\.safetensors: tensor row_labels is missing"):
        read_index(ids)
