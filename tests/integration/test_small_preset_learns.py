"""The demo's `small` preset learns image-text alignment from scratch on the demo corpus's scenes (CPU, ~2 min).

The demo's CapFilt result rests on this: a filter whose ITM cannot tell a matching text from another scene's
keeps nothing at BLIP's 0.5 threshold. Plain BlipPretrain training steps on rendered scenes with 40 % noisy web
texts (as the demo corpus makes them); measured on held-out scenes with their true captions.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from blip_models.configuration_blip import preset
from blip_models.modeling_pretrain import BlipPretrain
from blip_models.processing import eval_transform
from blip_models.tokenizer import load_tokenizer, tokenize
from pipelines.tasks import demo_corpus

pytestmark = pytest.mark.integration

STEPS, BATCH, HELD_OUT = 300, 24, 128


def scenes(count: int, seed: int, noise_fraction: float) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(seed)
    transform = eval_transform(preset("small").vision.image_size)
    images, texts = [], []
    for _ in range(count):
        scene = demo_corpus.random_scene(rng)
        images.append(transform(demo_corpus.render(scene, 96)))
        if rng.random() < noise_fraction:
            texts.append(demo_corpus.noise_text(rng.choice(demo_corpus.NOISE_KINDS), rng).lower())
        else:
            texts.append(demo_corpus.web_caption(scene, rng) if noise_fraction else demo_corpus.true_caption(scene))
    return torch.stack(images), texts


@torch.no_grad()
def held_out_scores(model: BlipPretrain, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    model.eval()
    embeds = model.visual_encoder(images)
    image_feat = F.normalize(model.vision_proj(embeds[:, 0]), dim=-1)
    text_feat = F.normalize(model.text_proj(model.text_encoder(ids, mask, mode="text").last_hidden_state[:, 0]), dim=-1)
    top5 = (image_feat @ text_feat.T).topk(5, dim=1).indices
    recall_at_5 = (top5 == torch.arange(len(ids))[:, None]).any(dim=1).float().mean().item()
    enc_ids = ids.clone()
    enc_ids[:, 0] = model.config.text.enc_token_id
    atts = torch.ones(embeds.shape[:2], dtype=torch.long)
    other = torch.roll(torch.arange(len(ids)), 1)  # each image with the next scene's caption
    match = model.itm_head(model.text_encoder(enc_ids, mask, embeds, atts, mode="multimodal").last_hidden_state[:, 0])
    mismatch = model.itm_head(
        model.text_encoder(enc_ids[other], mask[other], embeds, atts, mode="multimodal").last_hidden_state[:, 0]
    )
    model.train()
    return {"recall_at_5": recall_at_5, "itm_match": match.softmax(-1)[:, 1].mean().item(),
            "itm_mismatch": mismatch.softmax(-1)[:, 1].mean().item()}  # fmt: skip


def test_small_preset_learns_itc_itm_and_lm_from_scratch():
    torch.manual_seed(0)
    config = preset("small")
    model = BlipPretrain(config)
    tokenizer = load_tokenizer()
    train_images, train_texts = scenes(2000, seed=0, noise_fraction=0.4)
    test_images, test_texts = scenes(HELD_OUT, seed=99, noise_fraction=0.0)
    test_ids, test_mask = tokenize(tokenizer, test_texts, 30, "max_length")
    before = held_out_scores(model, test_images, test_ids, test_mask)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(1, STEPS + 1):
        for group in optimizer.param_groups:
            group["lr"] = 1.5e-3 * min(1.0, step / 50)  # the demo preset's warm-up
        index = torch.randint(0, len(train_texts), (BATCH,), generator=generator)
        ids, mask = tokenize(tokenizer, [train_texts[i] for i in index], 30, "max_length")
        output = model(train_images[index], ids, mask)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append([float(output.loss_itc.detach()), float(output.loss_itm.detach()), float(output.loss_lm.detach())])
    after = held_out_scores(model, test_images, test_ids, test_mask)
    first, last = (torch.tensor(losses[:50]).mean(0), torch.tensor(losses[-50:]).mean(0))
    print("held-out before", before, "after", after, "losses first", first.tolist(), "last", last.tolist())
    for index, name in enumerate(("itc", "itm", "lm")):
        assert last[index] < first[index], (name, first.tolist(), last.tolist())
    chance = 5 / HELD_OUT
    assert after["recall_at_5"] >= 4 * chance, (before, after)  # 128 held-out scenes: chance is 0.04
    assert after["itm_match"] - after["itm_mismatch"] >= 0.03, (before, after)
