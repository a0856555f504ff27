"""The byte-level GPT and the text corpus of the language-model task."""

from __future__ import annotations

import pytest
import torch

import fullsparse
from fullsparse.data.text import build_text_corpus, lm_batches
from fullsparse.errors import DataNotFoundError, UserError
from fullsparse.models.gpt import GPT


def _folder(tmp_path, files):
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_corpus_split_is_fixed_by_path_and_skips_tests(tmp_path):
    files = {f"pkg/mod{i}.py": f"x = {i}\n" * 20 for i in range(30)}
    files["test/test_big.py"] = "never read\n"
    root = _folder(tmp_path, files)
    a = build_text_corpus(root)
    b = build_text_corpus(root)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.files_train + a.files_val == 30 and a.files_val >= 1
    assert b"never read" not in bytes(a.train.tolist()) + bytes(a.val.tolist())
    capped = build_text_corpus(root, max_train_bytes=50, max_val_bytes=10)
    assert capped.train.numel() == 50 and capped.val.numel() == 10


def test_default_corpus_is_the_standard_library():
    corpus = build_text_corpus(max_train_bytes=20_000, max_val_bytes=5_000)
    assert corpus.name == "pystdlib"
    assert corpus.train.numel() == 20_000 and corpus.val.numel() == 5_000
    assert b"def " in bytes(corpus.train.tolist())


def test_missing_or_empty_corpus_is_one_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        build_text_corpus(tmp_path / "nope")
    with pytest.raises(DataNotFoundError, match="no .py/.txt"):
        build_text_corpus(tmp_path)


def test_lm_batches_are_shifted_windows():
    stream = torch.arange(100, dtype=torch.uint8)
    ((x, y),) = lm_batches(stream, 3, 8, num_batches=1)
    assert x.shape == (3, 8) and torch.equal(y, x + 1)
    assert x[1, 0] == 8  # validation windows are consecutive and non-overlapping
    gen = torch.Generator().manual_seed(0)
    batches = lm_batches(stream, 2, 8, generator=gen, num_batches=4)
    assert len(batches) == 4 and all(torch.equal(b[1], b[0] + 1) for b in batches)
    with pytest.raises(UserError, match="shorter than context"):
        lm_batches(stream[:5], 1, 8)


def test_gpt_is_causal_and_sparsifiable():
    torch.manual_seed(0)
    model = GPT(context=16, depth=2, embed_dim=32, num_heads=4)
    tokens = torch.randint(0, 256, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 256)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    # position t sees only tokens <= t
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10])
    report = fullsparse.sparsify_(model, "fst")
    assert report.sparse_names == [
        f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "fc1", "fc2")
    ]
    assert "last Linear" in report["lm_head"].reason
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda m, a: seen.append(a[0].ndim))
        for _, m in fullsparse.nn.sparse_modules(model)
    ]
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    assert seen and all(nd == 3 for nd in seen)  # tokens on dim -2: fst pairs them
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long))
