"""examples/train_tiny_transformer.py: the attn_ops model trains like its torch twin."""

import importlib.util
from pathlib import Path

import attn_ops

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_transformer.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("train_tiny_transformer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_losses_match_the_torch_twin_over_a_few_steps():
    example = _load_example()
    ours, reference = example.twin_models("cpu")
    assert isinstance(ours.blocks[0].attn, attn_ops.MultiheadAttention)
    history = example.train([ours, reference], steps=3, device="cpu")
    for ours_loss, reference_loss in history:
        # float32 losses of ~3.5 after a few optimizer steps: summation order alone moves them ~1e-6.
        assert abs(ours_loss - reference_loss) < 1e-5
