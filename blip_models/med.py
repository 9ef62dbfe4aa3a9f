"""MED: the BERT-shaped text transformer of BLIP ("multimodal mixture of encoder-decoder"), spec §1.1, §1.3, §1.5.

Follows BLIP `models/med.py` (itself a modified HF BERT): embeddings = word + absolute position (no token types),
post-LN layers of self-attention → optional cross-attention to image tokens → FFN, additive −10000 masks, a causal
decoder with a key/value cache, and an LM head tied to the word embeddings with label-smoothed (0.1) loss.
Module and parameter names match the official state dicts (`text_encoder.*`, `text_decoder.bert.*`,
`text_decoder.cls.predictions.*`). Attention runs through `F.scaled_dot_product_attention`.

Modes of `BertModel.forward`: `mode="text"` skips cross-attention (unimodal ITC encoder); `mode="multimodal"` runs it
(ITM / VQA question / decoder). `is_decoder=True` adds the causal mask. Modes are Python strings fixed per call site,
so the compiled graph has no data-dependent branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from blip_models.configuration_blip import TextConfig

# One (self_key, self_value, cross_key, cross_value) tuple per layer; cross entries are computed once.
LayerCache = tuple[torch.Tensor, ...]
Cache = tuple[LayerCache, ...]
# One (key, value) pair per layer of the cross-attention to an image, each (N_img, h, S, d): depends only on the
# image, so retrieval re-ranking computes it once per image instead of once per (image, text) pair.
CrossKV = tuple[tuple[torch.Tensor, torch.Tensor], ...]
Mode = Literal["text", "multimodal"]

MASK_VALUE = -10000.0  # the reference's additive mask value (not -inf), kept for parity


def additive_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 mask → (B, 1, 1, L) additive mask (0 keep, −10000 drop)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * MASK_VALUE


def additive_causal_mask(attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, P + L) padding mask → (B, 1, L, P + L) additive causal mask; the P cached positions are all visible."""
    total = attention_mask.shape[1]
    past = total - query_length
    query_pos = torch.arange(query_length, device=attention_mask.device)[:, None] + past  # (L, 1)
    key_pos = torch.arange(total, device=attention_mask.device)[None, :]  # (1, P + L)
    causal = (key_pos <= query_pos).to(dtype)  # (L, P + L)
    keep = causal[None, None] * attention_mask[:, None, None, :].to(dtype)  # (B, 1, L, P + L)
    return (1.0 - keep) * MASK_VALUE


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings → LayerNorm → dropout (no token-type embeddings)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        length = input_ids.shape[1]
        position_ids = torch.arange(past_length, past_length + length, device=input_ids.device)[None]  # (1, L)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # (B, L, H)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    """Multi-head attention with separate query/key/value Linears; cross-attention keys/values read `encoder_width`."""

    def __init__(self, config: TextConfig, is_cross_attention: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout_p = config.attention_dropout
        # GradCAM (`inference.gradcam`): when set, `attend` computes the attention probabilities explicitly and
        # keeps them, with their gradient, in `attention_probs` (B, h, L, S); the fused kernel otherwise.
        self.keep_attention = False
        self.attention_probs: torch.Tensor | None = None

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, d)

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `source` (B, S, W) → 2 × (B, h, S, d)."""
        return self._heads(self.key(source)), self._heads(self.value(source))

    def attend(
        self,
        hidden_states: torch.Tensor,  # (B, L, H) queries
        key: torch.Tensor,  # (B, h, S, d)
        value: torch.Tensor,  # (B, h, S, d)
        attention_mask: torch.Tensor | None,  # additive, broadcastable to (B, h, L, S)
    ) -> torch.Tensor:
        """Multi-head attention of the queries of `hidden_states` over given keys/values → context (B, L, H)."""
        query = self._heads(self.query(hidden_states))  # (B, h, L, d)
        mask = None if attention_mask is None else attention_mask.to(query.dtype)
        if self.keep_attention:
            scores = query @ key.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, h, L, S)
            probs = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            self.attention_probs = probs
            context = F.dropout(probs, self.dropout_p, self.training) @ value  # (B, h, L, d)
        else:
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0
            )  # (B, h, L, d)
        batch, _, length, _ = context.shape
        return context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)  # (B, L, H)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, L, H)
        attention_mask: torch.Tensor | None,  # additive, broadcastable to (B, h, L, S)
        key_value_states: torch.Tensor | None = None,  # (B, S, W) for cross-attention, None for self-attention
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        is_cross_attention: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if is_cross_attention and past_key_value is not None:
            key, value = past_key_value  # image/question keys do not change between decoding steps
        else:
            key, value = self.project_kv(key_value_states if is_cross_attention else hidden_states)  # (B, h, S, d)
            if past_key_value is not None:  # self-attention cache: append the new positions
                key = torch.cat([past_key_value[0], key], dim=2)
                value = torch.cat([past_key_value[1], value], dim=2)
        return self.attend(hidden_states, key, value, attention_mask), (key, value)


class BertSelfOutput(nn.Module):
    """dense → dropout → LayerNorm(x + residual) (post-LN)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    """`self` (attention heads) + `output` (projection, residual, LayerNorm)."""

    def __init__(self, config: TextConfig, is_cross_attention: bool = False) -> None:
        super().__init__()
        self.is_cross_attention = is_cross_attention
        self.self = BertSelfAttention(config, is_cross_attention)
        self.output = BertSelfOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_value_states: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        context, present = self.self(
            hidden_states, attention_mask, key_value_states, past_key_value, self.is_cross_attention
        )
        return self.output(context, hidden_states), present


class BertIntermediate(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden_states))  # exact (erf) GELU, as BERT's "gelu"


class BertOutput(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    """Self-attention → (multimodal only) cross-attention → FFN; every layer owns a cross-attention block."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.crossattention: nn.Module = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, L, H)
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
        mode: Mode,
        past: LayerCache | None = None,
        cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,  # this layer's precomputed image keys/values
    ) -> tuple[torch.Tensor, LayerCache]:
        hidden_states, self_kv = self.attention(
            hidden_states, attention_mask, past_key_value=None if past is None else (past[0], past[1])
        )
        present: LayerCache = self_kv
        if mode == "multimodal":
            cross_past = cross_kv  # precomputed image keys/values, else the decoding cache's cross entries
            if cross_past is None and past is not None and len(past) >= 4:
                cross_past = (past[2], past[3])
            hidden_states, cross_kv = self.crossattention(
                hidden_states, encoder_attention_mask, encoder_hidden_states, cross_past
            )
            present = present + tuple(cross_kv)
        hidden_states = self.output(self.intermediate(hidden_states), hidden_states)
        return hidden_states, present

    def forward_with_cross_kv(
        self,
        hidden_states: torch.Tensor,  # (B, L, H), B = R·G: G consecutive texts per image row
        attention_mask: torch.Tensor,  # additive self-attention mask (B, 1, 1, L)
        cross_key: torch.Tensor,  # (R, h, S, d), precomputed from the images
        cross_value: torch.Tensor,  # (R, h, S, d)
        first_token_only: bool = False,
    ) -> torch.Tensor:
        """Bidirectional multimodal layer with given cross-attention keys/values (no image mask: all tokens seen).

        Cross-attention treats every query token on its own, so the G texts of an image row attend as one
        sequence of G·L queries to that row's keys/values: image keys are never copied per text.
        `first_token_only` computes outputs for position 0 alone (B, 1, H), still attending to all L positions:
        in the last layer only `[ENC]` feeds the ITM head, and every position is independent after its attention.
        """
        queries = hidden_states[:, :1] if first_token_only else hidden_states  # (B, Lq, H)
        self_attention = self.attention.self
        key, value = self_attention.project_kv(hidden_states)  # (B, h, L, d)
        context = self_attention.attend(queries, key, value, attention_mask)  # (B, Lq, H)
        queries = self.attention.output(context, queries)
        batch, length, width = queries.shape
        rows = cross_key.shape[0]
        grouped = queries.reshape(rows, (batch // rows) * length, width)  # (R, G·Lq, H)
        context = self.crossattention.self.attend(grouped, cross_key, cross_value, None)  # (R, G·Lq, H)
        queries = self.crossattention.output(context.reshape(batch, length, width), queries)  # (B, Lq, H)
        return self.output(self.intermediate(queries), queries)  # (B, Lq, H)


class BertEncoder(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


@dataclass
class TextModelOutput:
    last_hidden_state: torch.Tensor  # (B, L, H)
    past_key_values: Cache | None = None


class BertModel(nn.Module):
    """The MED transformer (no pooler). Used as `text_encoder` and as `text_decoder.bert`."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.apply(lambda module: init_bert_weights(module, config.initializer_range))

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor | None = None,  # (B, L) or (B, P + L) with a cache
        encoder_hidden_states: torch.Tensor | None = None,  # (B, S, W)
        encoder_attention_mask: torch.Tensor | None = None,  # (B, S)
        mode: Mode = "multimodal",
        is_decoder: bool = False,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        cross_kv: CrossKV | None = None,  # per layer image (key, value), B rows: instead of encoder_hidden_states
    ) -> TextModelOutput:
        if mode not in ("text", "multimodal"):
            raise ValueError(f"BertModel: mode must be 'text' or 'multimodal', got {mode!r}")
        if mode == "multimodal" and encoder_hidden_states is None and past_key_values is None and cross_kv is None:
            raise ValueError("BertModel: mode='multimodal' needs encoder_hidden_states")
        batch, length = input_ids.shape
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        hidden = self.embeddings(input_ids, past_length)  # (B, L, H)
        dtype = hidden.dtype
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + length, device=input_ids.device)
        elif attention_mask.shape[1] == length and past_length:
            ones = torch.ones(batch, past_length, device=input_ids.device, dtype=attention_mask.dtype)
            attention_mask = torch.cat([ones, attention_mask], dim=1)  # the cached prefix stays visible
        if is_decoder:
            self_mask = additive_causal_mask(attention_mask, length, dtype)  # (B, 1, L, P + L)
        else:
            self_mask = additive_padding_mask(attention_mask, dtype)  # (B, 1, 1, L)
        cross_mask = None
        if mode == "multimodal" and encoder_attention_mask is not None:
            cross_mask = encode_cross_mask(encoder_attention_mask, dtype)
        presents: list[LayerCache] = []
        for index, layer in enumerate(self.encoder.layer):
            past = None if past_key_values is None else past_key_values[index]
            layer_kv = None if cross_kv is None else cross_kv[index]
            hidden, present = layer(hidden, self_mask, encoder_hidden_states, cross_mask, mode, past, layer_kv)
            if use_cache:
                presents.append(present)
        return TextModelOutput(hidden, tuple(presents) if use_cache else None)

    def precompute_cross_kv(self, encoder_hidden_states: torch.Tensor) -> CrossKV:
        """Every layer's cross-attention (key, value), each (N, h, S, d), of `encoder_hidden_states` (N, S, W)."""
        return tuple(layer.crossattention.self.project_kv(encoder_hidden_states) for layer in self.encoder.layer)

    def forward_pairs(
        self,
        input_ids: torch.Tensor,  # (P, L): text of pair p
        attention_mask: torch.Tensor,  # (P, L)
        cross_kv: CrossKV,  # per layer (key, value), each (N_img, h, S, d), from `precompute_cross_kv`
        image_index: torch.Tensor,  # (P,): image of pair p, a row of `cross_kv`
    ) -> TextModelOutput:
        """Multimodal encoding of (text p, image image_index[p]) pairs with the images' cross-attention keys/values
        picked by row instead of projected again for every pair: the same as `forward(input_ids, attention_mask,
        images[image_index], mode="multimodal")`, with each image projected once however many pairs use it."""
        return self.forward(input_ids, attention_mask, mode="multimodal", cross_kv=reorder_cache(cross_kv, image_index))

    def forward_with_cross_kv(
        self,
        input_ids: torch.Tensor,  # (B, L), B = R·G
        attention_mask: torch.Tensor,  # (B, L)
        cross_kv: CrossKV,  # per layer (key, value), each (R, h, S, d)
        first_token_only: bool = False,
    ) -> torch.Tensor:
        """Bidirectional multimodal encoding (`mode="multimodal"`, all image tokens visible) from cached
        cross-attention keys/values: texts come grouped, G = B // R consecutive texts per row of `cross_kv`.
        The same result as `forward(input_ids, attention_mask, images.repeat_interleave(G, 0), ones)` for the
        images whose keys/values the R rows hold. Returns (B, L, H), or (B, 1, H) with `first_token_only` (the
        last layer then computes position 0 only)."""
        rows = cross_kv[0][0].shape[0]
        if len(cross_kv) != len(self.encoder.layer):
            raise ValueError(f"BertModel: cross_kv has {len(cross_kv)} layers, the model {len(self.encoder.layer)}")
        if input_ids.shape[0] % rows:
            raise ValueError(f"BertModel: {input_ids.shape[0]} texts do not split into {rows} equal image groups")
        hidden = self.embeddings(input_ids)  # (B, L, H)
        self_mask = additive_padding_mask(attention_mask, hidden.dtype)  # (B, 1, 1, L)
        last = len(self.encoder.layer) - 1
        for index, (layer, (key, value)) in enumerate(zip(self.encoder.layer, cross_kv)):
            hidden = layer.forward_with_cross_kv(hidden, self_mask, key, value, first_token_only and index == last)
        return hidden  # (B, L, H); (B, 1, H) with first_token_only


def encode_cross_mask(encoder_attention_mask: torch.Tensor | tuple, dtype: torch.dtype) -> torch.Tensor | tuple:
    """Additive cross-attention mask(s); a tuple (NLVR2's two images) gives a tuple."""
    if isinstance(encoder_attention_mask, (tuple, list)):
        return tuple(additive_padding_mask(mask, dtype) for mask in encoder_attention_mask)
    return additive_padding_mask(encoder_attention_mask, dtype)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    """transform → decoder Linear (weight tied to word embeddings) + separate `bias`."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states)) + self.bias  # (B, L, V)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.predictions(hidden_states)


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (B, L, V); None when computed with return_logits=False
    loss: torch.Tensor | None = None  # scalar, or (B,) per-sequence sums with reduction="none"
    past_key_values: Cache | None = None


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token CE on shifted logits, ignore −100; reduction "none" returns the per-sequence SUM (B,)."""
    valid = labels[:, 1:] != -100  # (B, L-1)
    return _target_loss(logits[:, :-1][valid], labels, valid, label_smoothing, reduction)


def _target_loss(
    target_logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, label_smoothing: float, reduction: str
) -> torch.Tensor:
    """CE of the (N, V) logits at the `valid` (B, L-1) positions against their next tokens, reduced."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"lm_loss: reduction must be 'mean' or 'none', got {reduction!r}")
    per_token = F.cross_entropy(target_logits.float(), labels[:, 1:][valid], label_smoothing=label_smoothing,
                                reduction="none")  # fmt: skip
    if reduction == "mean":
        return per_token.mean()
    rows = valid.nonzero()[:, 0]  # per-sequence SUM (B,)
    return torch.zeros(labels.shape[0], dtype=per_token.dtype, device=per_token.device).index_add_(0, rows, per_token)


class BertLMHeadModel(nn.Module):
    """Image-grounded text decoder (`text_decoder`): `bert` (causal MED) + `cls` (tied LM head)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.cls.apply(lambda module: init_bert_weights(module, config.initializer_range))
        self.tie_weights()

    def tie_weights(self) -> None:
        """LM decoder weight IS the word-embedding Parameter."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L), position 0 = [DEC]
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,  # (B, S, W)
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # (B, L), −100 = ignored
        reduction: str = "mean",
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        mode: Mode = "multimodal",
        return_logits: bool = True,  # False (training): the LM head runs on target positions only
        cross_kv: CrossKV | None = None,  # precomputed image keys/values, instead of encoder_hidden_states
    ) -> LMOutput:
        output = self.bert(
            input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
            mode=mode, is_decoder=True, past_key_values=past_key_values, use_cache=use_cache, cross_kv=cross_kv,
        )  # fmt: skip
        if not return_logits and labels is not None:
            loss = self._loss_on_targets(output.last_hidden_state, labels, reduction)
            return LMOutput(logits=None, loss=loss, past_key_values=output.past_key_values)
        logits = self.cls(output.last_hidden_state)  # (B, L, V)
        loss = None
        if labels is not None:
            loss = lm_loss(logits, labels, self.config.label_smoothing, reduction)
        return LMOutput(logits=logits, loss=loss, past_key_values=output.past_key_values)

    def _loss_on_targets(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
        """`lm_loss` without the (B, L, V) logits: the vocabulary projection is the largest matmul of a training
        step and padding positions (−100) are a large share of BLIP's fixed 30-token batches, so only the
        positions with a target go through the LM head. Same value as `lm_loss` on the full logits."""
        valid = labels[:, 1:] != -100  # (B, L-1)
        return _target_loss(self.cls(hidden[:, :-1][valid]), labels, valid, self.config.label_smoothing, reduction)


def with_first_token(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Copy of `input_ids` whose position 0 is `token_id` ([ENC] for grounded encoding, [DEC] for decoding)."""
    output = input_ids.clone()
    output[:, 0] = token_id
    return output


class _SelectRows(torch.autograd.Function):
    """`source.index_select(0, index)` whose backward is a one-hot matrix product instead of `index_add_`.

    The training steps pick image keys/values per pair with repeated indices (hard negatives); the gradient of
    such a pick sums the rows that share an index. `index_add_` does that with atomic adds, which for bf16 on a
    GPU took 8 % of a compiled BLIP-base pretraining step (H200, batch 512: 24 calls). A (N x P) one-hot times
    (P x rest) product sums the same rows on the tensor cores in about a fifth of the time, accumulates in fp32
    (index_add_ rounds to bf16 at every add) and is deterministic."""

    @staticmethod
    def forward(ctx: Any, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.num_rows = source.shape[0]
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        picks = F.one_hot(index, ctx.num_rows).to(grad.dtype).T  # (N, P): row n sums the picks of source row n
        return (picks @ grad.reshape(grad.shape[0], -1)).view(ctx.num_rows, *grad.shape[1:]), None


def select_rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of `source` (dim 0), indices may repeat; differentiable with an atomic-free backward."""
    if torch.is_grad_enabled() and source.requires_grad:
        return _SelectRows.apply(source, index)
    return source.index_select(0, index)


def reorder_cache(past_key_values: Cache, index: torch.Tensor) -> Cache:
    """Select rows of every cached tensor: beam search bookkeeping, and image keys/values picked per pair."""
    return tuple(tuple(select_rows(tensor, index) for tensor in layer) for layer in past_key_values)


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT init: normal(0, std) for Linear/Embedding, LayerNorm to (1, 0), zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def tie_encoder_decoder_weights(encoder: nn.Module, decoder: nn.Module, skip_key: str = "/attention") -> list[str]:
    """Make `encoder` reuse the decoder's weight/bias Parameters, except under paths containing `skip_key`.

    Paths are written '/encoder/layer/0/attention/self/query'; '/crossattention' does not contain '/attention', so
    cross-attention, embeddings and FFNs are shared and only self-attention stays separate (spec §1.5).
    Returns the dotted names of the encoder modules that now share parameters.
    """
    decoder_modules = dict(decoder.named_modules())
    tied: list[str] = []
    for name, module in encoder.named_modules():
        if not name or skip_key in "/" + name.replace(".", "/"):
            continue
        if name not in decoder_modules:
            raise ValueError(f"tie_encoder_decoder_weights: decoder has no module {name!r}")
        target = decoder_modules[name]
        shared = False
        for attr in ("weight", "bias"):
            param = module._parameters.get(attr)
            if param is None:
                continue
            other = target._parameters.get(attr)
            if other is None or other.shape != param.shape:
                raise ValueError(f"tie_encoder_decoder_weights: {name}.{attr} has no same-shaped decoder twin")
            setattr(module, attr, other)
            shared = True
        if shared:
            tied.append(name)
    return tied
