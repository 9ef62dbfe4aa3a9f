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
