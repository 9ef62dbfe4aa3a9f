"""Model-agnostic image-text retrieval evaluation of BLIP (Li et al. 2022), salesforce/BLIP
`train_retrieval.py:evaluation()` (shared/docs/blip_spec.md §4.1 and §4.5).

Given normalised ITC embeddings and an ITM scorer, BLIP ranks by cosine similarity, re-ranks the top-`k_test`
candidates of every query with the image-grounded text encoder and scores them `itm_logit + cosine`; every
other entry is -100. Both directions are computed: image→text (`score_i2t`, N_img × N_txt) and text→image
(`score_t2i`, N_txt × N_img).

Differences from the reference script, none of which changes a score:
- the ITM re-ranking is batched across queries: the (query, candidate) pairs of many rows go through the
  scorer `pairs_per_batch` at a time instead of one forward of k pairs per row;
- a pair that is in the top-k of both directions is scored once and used for both (`share_pairs`);
- a slice of rows (`image_rows`, `text_rows`) gives a partial result that is zero outside the slice, so the
  slices of several workers add up to the full matrices (BLIP splits rows across ranks and `all_reduce`s).
`retrieval_scores_loop` is the reference per-query loop, kept for tests and benchmarks.

Scorers for a BLIP model (`BlipRetrieval` or `BlipITM`):
- `itm_score_fn_for`: the fast one. Cross-attention keys/values of an image depend only on the image, and with
  1+N image tokens ≫ 35 text tokens projecting them is the dominant cost of a pair; they are computed once per
  image (lazily, kept in a bounded LRU); the texts of one image attend to them together as one long query
  sequence (`group_pairs`, `itm_logits_grouped`), so they are not even copied per pair. It also drops the
  padding columns that no text of the call uses (masked keys get weight exp(-10000) = 0, so logits are
  unchanged) and computes only `[ENC]` in the last layer.
- `uncached_itm_score_fn_for`: `itm_logits` on the gathered image embeddings, as the reference script (with
  `retrieval_scores_loop`: one uncached forward of k candidates per query).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

# (image_indices (n,), text_indices (n,)) -> raw ITM positive logits (n,), i.e. itm_head(...)[:, 1].
ItmScoreFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]

NOT_RANKED = -100.0  # BLIP's fill value for pairs outside the top-k


@dataclass(frozen=True)
class RetrievalScores:
    score_i2t: torch.Tensor  # (N_img, N_txt)
    score_t2i: torch.Tensor  # (N_txt, N_img)
    itm_pairs: int  # pairs sent to the ITM scorer
    itm_calls: int  # scorer calls


class CachedItmModel(Protocol):
    """What `itm_score_fn_for` needs: `blip_models.BlipRetrieval` and `BlipITM` have both."""

    def precompute_cross_kv(self, image_embeds: torch.Tensor) -> Any: ...

    def itm_logits_grouped(self, cross_kv: Any, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor: ...

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor: ...


def split_rows(num_rows: int, num_parts: int) -> list[range]:
    """Contiguous row ranges, one per worker, as BLIP splits them across ranks (`step = n // parts + 1`)."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    step = num_rows // num_parts + 1
    return [range(min(num_rows, part * step), min(num_rows, (part + 1) * step)) for part in range(num_parts)]


def similarity_matrix(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of normalised ITC features (no temperature): (N_img, D) @ (D, N_txt)."""
    if image_embeds.dim() != 2 or text_embeds.dim() != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"expected (N_img, D) and (N_txt, D) embeddings, got {tuple(image_embeds.shape)} and "
                         f"{tuple(text_embeds.shape)}")
    return image_embeds.float() @ text_embeds.float().T  # (N_img, N_txt)


def _check_rows(rows: range | None, num_rows: int, name: str) -> range:
    rows = range(num_rows) if rows is None else rows
    if rows.step != 1 or rows.start < 0 or rows.stop > num_rows:
        raise ValueError(f"{name} must be a contiguous range within [0, {num_rows}), got {rows}")
    return rows


def _score_pairs(itm_score_fn: ItmScoreFn, image_indices: torch.Tensor, text_indices: torch.Tensor,
                 pairs_per_batch: int, on_pairs: Callable[[int, int], None] | None = None,
                 ) -> tuple[torch.Tensor, int]:  # fmt: skip
    """Scores of all pairs, `pairs_per_batch` per scorer call; returns (scores (n,), number of calls).
    `on_pairs(done, total)` after each call."""
    import torch

    scores = torch.empty(len(image_indices), dtype=torch.float32)
    calls = 0
    for start in range(0, len(image_indices), pairs_per_batch):
        end = min(start + pairs_per_batch, len(image_indices))
        logits = itm_score_fn(image_indices[start:end], text_indices[start:end])
        if logits.shape != (end - start,):
            raise ValueError(f"itm_score_fn returned shape {tuple(logits.shape)} for {end - start} pairs; "
                             "expected one raw positive ITM logit per pair")
        scores[start:end] = logits.detach().float().cpu()
        calls += 1
        if on_pairs is not None:
            on_pairs(end, len(image_indices))
    return scores, calls


def retrieval_scores_from_sims(sims: torch.Tensor, itm_score_fn: ItmScoreFn, k_test: int, *,
                               pairs_per_batch: int = 1024, image_rows: range | None = None,
                               text_rows: range | None = None, share_pairs: bool = True,
                               on_pairs: Callable[[int, int], None] | None = None) -> RetrievalScores:
    """BLIP's re-ranked score matrices from a similarity matrix `sims` (N_img, N_txt), batched.

    Only rows in `image_rows` of score_i2t and `text_rows` of score_t2i are computed (default: all); rows
    outside them are 0, so summing the results of disjoint slices gives the full matrices. `on_pairs(done, total)`
    is told the pairs scored so far after each scorer call (a progress bar)."""
    import torch

    if k_test < 1 or pairs_per_batch < 1:
        raise ValueError(f"k_test and pairs_per_batch must be >= 1, got {k_test} and {pairs_per_batch}")
    sims = sims.detach().float().cpu()
    num_images, num_texts = sims.shape
    image_rows = _check_rows(image_rows, num_images, "image_rows")
    text_rows = _check_rows(text_rows, num_texts, "text_rows")
    k_i2t, k_t2i = min(k_test, num_texts), min(k_test, num_images)

    with torch.no_grad():
        i2t_sims, i2t_texts = sims[image_rows.start:image_rows.stop].topk(k_i2t, dim=1)  # (R_i, k)
        t2i_sims, t2i_images = sims[:, text_rows.start:text_rows.stop].T.topk(k_t2i, dim=1)  # (R_t, k)
        # All (image, text) pairs of both directions; the i2t half is image-major (consecutive pairs share an
        # image), and so is the sorted de-duplicated list when share_pairs is on.
        pair_images = torch.cat([torch.arange(image_rows.start, image_rows.stop).repeat_interleave(k_i2t),
                                 t2i_images.reshape(-1)])
        pair_texts = torch.cat([i2t_texts.reshape(-1),
                                torch.arange(text_rows.start, text_rows.stop).repeat_interleave(k_t2i)])
        if share_pairs:
            keys, inverse = torch.unique(pair_images * num_texts + pair_texts, sorted=True, return_inverse=True)
            unique_scores, calls = _score_pairs(itm_score_fn, keys // num_texts, keys % num_texts, pairs_per_batch,
                                                on_pairs)
            pair_scores, scored = unique_scores[inverse], len(keys)
        else:
            pair_scores, calls = _score_pairs(itm_score_fn, pair_images, pair_texts, pairs_per_batch, on_pairs)
            scored = len(pair_images)
        i2t_logits = pair_scores[: i2t_texts.numel()].view_as(i2t_texts)  # (R_i, k)
        t2i_logits = pair_scores[i2t_texts.numel():].view_as(t2i_images)  # (R_t, k)

        score_i2t = torch.zeros(num_images, num_texts)
        block = torch.full((len(image_rows), num_texts), NOT_RANKED)
        score_i2t[image_rows.start:image_rows.stop] = block.scatter_(1, i2t_texts, i2t_logits + i2t_sims)
        score_t2i = torch.zeros(num_texts, num_images)
        block = torch.full((len(text_rows), num_images), NOT_RANKED)
        score_t2i[text_rows.start:text_rows.stop] = block.scatter_(1, t2i_images, t2i_logits + t2i_sims)
    return RetrievalScores(score_i2t, score_t2i, scored, calls)


def retrieval_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor, itm_score_fn: ItmScoreFn,
                     k_test: int, **options: object) -> RetrievalScores:
    """`retrieval_scores_from_sims` on the cosine similarities of normalised image and text embeddings
    (for video, the image embedding is the normalised mean of the frame embeddings)."""
    return retrieval_scores_from_sims(similarity_matrix(image_embeds, text_embeds), itm_score_fn, k_test,
                                      **options)  # type: ignore[arg-type]


def retrieval_scores_loop(sims: torch.Tensor, itm_score_fn: ItmScoreFn, k_test: int) -> RetrievalScores:
    """The reference algorithm: one scorer call with the k candidates of each image, then of each text."""
    import torch

    sims = sims.detach().float().cpu()
    num_images, num_texts = sims.shape
    k_i2t, k_t2i = min(k_test, num_texts), min(k_test, num_images)
    score_i2t = torch.full((num_images, num_texts), NOT_RANKED)
    score_t2i = torch.full((num_texts, num_images), NOT_RANKED)
    with torch.no_grad():
        for image in range(num_images):
            topk_sims, topk_texts = sims[image].topk(k_i2t)
            logits = itm_score_fn(torch.full((k_i2t,), image), topk_texts)
            score_i2t[image, topk_texts] = logits.detach().float().cpu() + topk_sims
        for text in range(num_texts):
            topk_sims, topk_images = sims[:, text].topk(k_t2i)
            logits = itm_score_fn(topk_images, torch.full((k_t2i,), text))
            score_t2i[text, topk_images] = logits.detach().float().cpu() + topk_sims
    pairs = num_images * k_i2t + num_texts * k_t2i
    return RetrievalScores(score_i2t, score_t2i, pairs, num_images + num_texts)


def _check_features(image_embeds: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> None:
    if image_embeds.dim() != 3:
        raise ValueError("image_embeds must be (N_img, 1+N, Dv) visual-encoder outputs, got "
                         f"{tuple(image_embeds.shape)}")
    if text_ids.dim() != 2 or text_ids.shape != text_mask.shape:
        raise ValueError(f"text_ids and text_mask must both be (N_txt, L), got {tuple(text_ids.shape)} and "
                         f"{tuple(text_mask.shape)}")


def uncached_itm_score_fn_for(model: CachedItmModel, image_embeds: torch.Tensor, text_ids: torch.Tensor,
                              text_mask: torch.Tensor) -> ItmScoreFn:
    """Scorer of the reference script: `itm_logits` of each pair, image tokens re-projected in every layer."""
    import torch

    _check_features(image_embeds, text_ids, text_mask)
    device = image_embeds.device

    def itm_score_fn(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        image_index, text_index = image_index.to(device), text_index.to(device)
        with torch.no_grad():
            logits = model.itm_logits(image_embeds[image_index], text_ids[text_index], text_mask[text_index])
        return logits[:, 1]  # (n,)

    return itm_score_fn


def group_pairs(image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Lay pairs out as rows of G slots that share one image, for `itm_logits_grouped`.

    Returns (images (U,) the distinct images, row_image (R,) index into `images` of each row, slot (n,) the slot
    of every pair in the flattened (R·G) layout, G). An image with c pairs takes ceil(c / G) rows; G minimises
    padded slots + rows (a row costs a copy of its image's keys/values), so R·G + R <= 2n (G = 1 costs 2n)."""
    import torch

    images, local = torch.unique(image_index, return_inverse=True)  # (U,), (n,)
    per_image = torch.bincount(local, minlength=len(images))  # (U,)
    candidates = torch.arange(1, int(per_image.max()) + 1)  # (C,) possible G
    rows = (-(-per_image[None, :] // candidates[:, None])).sum(dim=1)  # (C,) R for each G
    group = int(candidates[torch.argmin(rows * candidates + rows)])
    rows_per_image = -(-per_image // group)  # (U,)
    row_image = torch.repeat_interleave(torch.arange(len(images)), rows_per_image)  # (R,)
    order = torch.argsort(local, stable=True)  # pairs grouped by image
    first_pair = torch.cumsum(per_image, 0) - per_image  # (U,) position of an image's first pair in `order`
    first_row = torch.cumsum(rows_per_image, 0) - rows_per_image  # (U,)
    position = torch.arange(len(image_index)) - first_pair[local[order]]  # rank of each sorted pair in its image
    slot = torch.empty(len(image_index), dtype=torch.long)
    slot[order] = (first_row[local[order]] + position // group) * group + position % group
    return images, row_image, slot, group


def itm_score_fn_for(model: CachedItmModel, image_embeds: torch.Tensor, text_ids: torch.Tensor,
                     text_mask: torch.Tensor, *, max_cached_images: int | None = 16,
                     trim_padding: bool = True) -> ItmScoreFn:
    """Scorer with per-image cross-attention keys/values, for `retrieval_scores(_from_sims)`.

    `image_embeds` (N_img, 1+N, Dv) are the visual-encoder outputs, `text_ids`/`text_mask` (N_txt, L) the
    `[CLS]`-first tokens (as for `itm_logits`; the model puts `[ENC]` first). Keys/values of an image are computed the
    first time a call needs it, then kept for the last `max_cached_images` images used (None: all; a base-size image
    holds 12 layers × 2 × 577 × 768 floats ≈ 42 MB in fp32). `retrieval_scores_from_sims` with `share_pairs` sends
    pairs sorted by image, so each image is projected about once even with a small cache. Within a call, the texts
    of one image attend to its keys/values together (`group_pairs`, `itm_logits_grouped`), never copied per pair.
    """
    import torch

    _check_features(image_embeds, text_ids, text_mask)
    if max_cached_images is not None and max_cached_images < 0:
        raise ValueError(f"max_cached_images must be >= 0 or None, got {max_cached_images}")
    device = image_embeds.device
    cache: OrderedDict[int, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()  # image -> per layer (K, V)

    def image_kv(images: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per image, per layer (K, V) each (h, 1+N, d): cached, or projected now for the missing ones."""
        missing = [image for image in images if image not in cache]
        fresh: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        if missing:
            layers = model.precompute_cross_kv(image_embeds[torch.tensor(missing, device=device)])
            # copies, so that evicting an image frees it (a view would keep the whole batch's tensor alive)
            fresh = {image: [(key[row].clone(), value[row].clone()) for key, value in layers]
                     for row, image in enumerate(missing)}
        per_image = [cache[image] if image in cache else fresh[image] for image in images]
        for image, kv in zip(images, per_image):  # most recently used last; evict the oldest
            cache[image] = kv
            cache.move_to_end(image)
        while max_cached_images is not None and len(cache) > max_cached_images:
            cache.popitem(last=False)
        return per_image

    def itm_score_fn(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        if len(image_index) == 0:
            return torch.empty(0, device=device)
        images, row_image, slot, group = group_pairs(image_index.cpu())
        slot_text = torch.full((len(row_image) * group,), int(text_index[0]), dtype=torch.long)  # padding: any text
        slot_text[slot] = text_index.cpu()
        slot_text = slot_text.to(device)
        input_ids, attention_mask = text_ids[slot_text], text_mask[slot_text]  # (R·G, L)
        if trim_padding:  # columns that are padding in every text of the call change no logit
            used = attention_mask.bool().any(dim=0).nonzero()
            length = int(used.max()) + 1 if len(used) else 1
            input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
        with torch.no_grad():
            per_image = image_kv(images.tolist())
            rows = [per_image[int(image)] for image in row_image]
            cross_kv = tuple((torch.stack([kv[layer][0] for kv in rows]),
                              torch.stack([kv[layer][1] for kv in rows]))
                             for layer in range(len(rows[0])))  # per layer (K, V), each (R, h, 1+N, d)
            logits = model.itm_logits_grouped(cross_kv, input_ids, attention_mask)  # (R·G, 2)
        return logits[slot.to(device), 1]  # (n,)

    return itm_score_fn
