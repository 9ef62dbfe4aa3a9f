"""Regional compilation (`blip_models.compilation`): blocks compiled in place, same outputs, same parameter names."""

from __future__ import annotations

from pathlib import Path

import torch

from blip_models.compilation import compile_blocks, transformer_blocks
from blip_models.configuration_blip import preset


def test_compiled_vit_blocks_give_the_eager_output_and_keep_names() -> None:
    from blip_models.modeling_itm import BlipITM

    torch.manual_seed(0)
    config = preset("tiny")
    model = BlipITM(config).eval()
    pixels = torch.randn(2, 3, config.vision.image_size, config.vision.image_size)
    names = list(model.state_dict())
    with torch.no_grad():
        eager = model.visual_encoder(pixels)
        assert compile_blocks(model, vision_only=True) == config.vision.depth  # text layers stay eager
        compiled = model.visual_encoder(pixels)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert list(model.state_dict()) == names
    text_layers = [b for b in transformer_blocks(model) if b not in set(model.visual_encoder.blocks)]
    assert text_layers and all(layer._compiled_call_impl is None for layer in text_layers)


def test_training_setup_compiles_every_block_when_asked(tmp_path: Path) -> None:
    """`loop.compile: true` reaches the model the loop trains (without running it: CPU compilation is slow)."""
    from pipelines.tasks._ray_train import setup
    from pipelines.tasks.pretrain import PretrainConfig, worker_config
    from pipelines.tasks.train_data import ShardRef
    from pipelines.tasks.train_loop import LoopConfig

    config = PretrainConfig(model="tiny", loop=LoopConfig(compile=True, max_steps=1))
    shards = [ShardRef(str(tmp_path / "train-000000.tar"), 4 * config.data.batch_size)]  # never read
    _, _, loop = setup(worker_config(config, shards), 0, 1, torch.device("cpu"))
    blocks = transformer_blocks(loop.model)
    assert len(blocks) > 4 and all(block._compiled_call_impl is not None for block in blocks)


# ------------------------------------------------------------------------- no graph breaks in the encoders
# The issue asks for `torch.compile`-friendly encoders: a graph break splits the compiled forward and hands the
# gap back to Python. `torch._dynamo.explain` traces without compiling (seconds on CPU for the tiny preset).


def _graph_breaks(module: torch.nn.Module, *args: object, **kwargs: object) -> tuple[int, list[object], str]:
    torch._dynamo.reset()  # each trace from scratch: no cached guards from another test
    explanation = torch._dynamo.explain(module)(*args, **kwargs)
    code = "\n".join(graph.code for graph in explanation.graphs)
    return explanation.graph_break_count, explanation.break_reasons, code


def _text_inputs(config: object) -> tuple[torch.Tensor, ...]:
    input_ids = torch.randint(5, 1000, (2, 6))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0
    image_embeds = torch.randn(2, 17, config.text.encoder_width)  # type: ignore[attr-defined]
    return input_ids, attention_mask, image_embeds, torch.ones(2, 17, dtype=torch.long)


def test_vit_traces_without_graph_breaks_in_eval_and_checkpointed_training() -> None:
    from blip_models.vit import VisionTransformer

    torch.manual_seed(0)
    config = preset("tiny")
    vit = VisionTransformer(config.vision).eval()
    pixels = torch.randn(2, 3, config.vision.image_size, config.vision.image_size)
    breaks, reasons, _ = _graph_breaks(vit, pixels)
    assert breaks == 0, reasons
    vit.train()
    vit.set_grad_checkpointing(1)  # the last block recomputed in backward: a higher-order op dynamo must keep
    breaks, reasons, code = _graph_breaks(vit, pixels)
    assert breaks == 0, reasons
    assert "checkpoint" in code  # the checkpointed block really was part of the trace


def test_text_encoder_traces_without_graph_breaks_in_both_modes() -> None:
    from blip_models.med import BertModel

    torch.manual_seed(0)
    config = preset("tiny")
    encoder = BertModel(config.text).eval()
    input_ids, attention_mask, image_embeds, image_mask = _text_inputs(config)
    breaks, reasons, _ = _graph_breaks(encoder, input_ids, attention_mask, mode="text")  # unimodal [CLS]
    assert breaks == 0, reasons
    breaks, reasons, _ = _graph_breaks(encoder, input_ids, attention_mask, image_embeds, image_mask, mode="multimodal")
    assert breaks == 0, reasons


def test_text_decoder_traces_without_graph_breaks_with_and_without_cache() -> None:
    from blip_models.med import BertLMHeadModel

    torch.manual_seed(0)
    config = preset("tiny")
    decoder = BertLMHeadModel(config.text).eval()
    input_ids, attention_mask, image_embeds, image_mask = _text_inputs(config)
    breaks, reasons, _ = _graph_breaks(decoder, input_ids, attention_mask, image_embeds, image_mask, use_cache=True)
    assert breaks == 0, reasons
    with torch.no_grad():
        past = decoder(input_ids, attention_mask, image_embeds, image_mask, use_cache=True).past_key_values
    next_token = input_ids[:, -1:]  # one decoding step over the cached prefix (self and cross keys/values)
    breaks, reasons, _ = _graph_breaks(decoder, next_token, None, image_embeds, image_mask, past_key_values=past,
                                       use_cache=True)  # fmt: skip
    assert breaks == 0, reasons
