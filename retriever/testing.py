"""Tiny transformer models built locally (random weights, a tokenizer trained on the fly) for
fast tests: no download, a forward pass in milliseconds."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

_DEFAULT_TEXTS = [
    "dense retrieval maps queries and documents to vectors",
    "hard negatives are documents that look relevant but are not",
    "the quick brown fox jumps over the lazy dog",
    "contrastive learning pulls positives together and pushes negatives apart",
    "faiss searches millions of vectors by inner product",
    "bm25 scores documents by term frequency and inverse document frequency",
    "a cross encoder reads the query and the document together",
    "python functions return values and raise exceptions",
]


def build_tiny_model(path: str | Path, texts: Iterable[str] = (), vocab_size: int = 400, hidden: int = 32,
                     layers: int = 2, heads: int = 2, max_position: int = 256, seed: int = 0) -> Path:
    """Write a random-weight BERT and a WordPiece tokenizer trained on ``texts`` to ``path``."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    corpus = list(texts) or []
    tok.train_from_iterator(corpus + _DEFAULT_TEXTS * 4, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_position)
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=hidden * 2, max_position_embeddings=max_position)
    BertModel(config).save_pretrained(path)
    return path
