"""BLIP model family in pure torch (+ timm, transformers, safetensors): Li et al. 2022, salesforce/BLIP layout.

Nothing heavy is imported here; `model_class(task)` imports on demand.

Public contract (stable; see each module's docstring):
- configuration_blip: `VisionConfig`, `TextConfig`, `BlipConfig`, `preset(name)` ('tiny' | 'base' | 'large'),
  `to_dict(config)`, `from_dict(raw)`; YAML twins in configs/model/{tiny,base,large}.yaml.
- tokenizer: `load_tokenizer(source=None)` ([DEC]=30522, [ENC]=30523, len 30524), `tokenize(tok, texts, max_length,
  padding)` → (input_ids, attention_mask).
- processing: `pre_caption`, `pre_question`, `RandomAugment`, `train_transform(size, min_scale)`,
  `eval_transform(size)`.
- vit: `VisionTransformer(VisionConfig)`, `interpolate_pos_embed(pos_embed, num_patches_new)`.
- med: `BertModel`, `BertLMHeadModel`, `tie_encoder_decoder_weights`, `lm_loss`, `reorder_cache`.
- generation: `GenerationConfig`, `generate`, `beam_search`, `sample`.
- Task models, each `__init__(config: BlipConfig)`; module names follow the official checkpoints:
  pretrain   BlipPretrain(...).forward(pixel_values, input_ids, attention_mask, alpha=None, image_ids=None)
             → PretrainOutput(loss, loss_itc, loss_itm, loss_lm); momentum_update(), copy_params(),
             dequeue_and_enqueue(image_feat, text_feat); prepare_text(tok, captions, max_length=30)
  retrieval  BlipRetrieval.forward(pixel_values, input_ids, attention_mask, image_ids, alpha=None)
             → RetrievalOutput(loss, loss_itc, loss_itm); image_features, text_features, itm_logits, score
  itm        BlipITM.forward(pixel_values, input_ids, attention_mask, match_head='itm'|'itc'|'both', labels=None)
             → ITMOutput(itm_logits, itc_similarity, loss); itm_probability(...) → (B,)
  caption    BlipCaption.forward(pixel_values, input_ids, attention_mask, prompt_length=None) → CaptionOutput;
             generate(pixel_values, tokenizer, prompt=None, do_sample, num_beams, max_length, min_length, top_p,
             repetition_penalty, num_return_sequences, generator) → list[str]; generate_ids(...); prepare_text
  vqa        BlipVQA.forward(pixel_values, question_ids, question_mask, answer_ids, answer_mask, weights, n_answers)
             → VQAOutput(loss); answer(pixel_values, question_ids, question_mask, tokenizer, mode='rank'|'generate',
             answer_list, k_test, num_beams, max_length, min_length) → list[str]; rank_answers; prepare_answers
  nlvr       BlipNLVR.forward(pixel_values_left, pixel_values_right, input_ids, attention_mask, labels=None)
             → NLVROutput(logits, loss)
  features   BlipFeatureExtractor.forward / extract_features(pixel_values, input_ids, attention_mask, mode)
             → FeatureOutput(image_embeds, image_embeds_proj, text_embeds, text_embeds_proj, multimodal_embeds)
"""

from __future__ import annotations

import importlib
from typing import Any

# task name → (module, class); imported lazily by `model_class`.
MODEL_CLASSES: dict[str, tuple[str, str]] = {
    "pretrain": ("blip_models.modeling_pretrain", "BlipPretrain"),
    "retrieval": ("blip_models.modeling_retrieval", "BlipRetrieval"),
    "itm": ("blip_models.modeling_itm", "BlipITM"),
    "caption": ("blip_models.modeling_caption", "BlipCaption"),
    "vqa": ("blip_models.modeling_vqa", "BlipVQA"),
    "nlvr": ("blip_models.modeling_nlvr", "BlipNLVR"),
    "features": ("blip_models.modeling_features", "BlipFeatureExtractor"),
}


def model_class(task: str) -> Any:
    """The model class for a task name in MODEL_CLASSES (imports torch on first use)."""
    if task not in MODEL_CLASSES:
        raise ValueError(f"unknown BLIP task {task!r}; choose one of {sorted(MODEL_CLASSES)}")
    module_name, class_name = MODEL_CLASSES[task]
    return getattr(importlib.import_module(module_name), class_name)


def build_model(task: str, config: Any) -> Any:
    """Instantiate the task model for `config` (a BlipConfig)."""
    return model_class(task)(config)
