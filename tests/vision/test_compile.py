"""Regional compilation finds the blocks of our backbones and timm's, and keeps the function."""

import pytest
import timm
import torch
from torch import nn

import zoo
from zoo.vision.compile import compile_blocks, repeated_blocks


@pytest.mark.parametrize(
    "name, count, kind",
    [
        ("favit_b2", 26, "Block"),
        ("swin_tiny_patch4_window7_224", 12, "SwinTransformerBlock"),
        ("pvt_v2_b0", 8, "Block"),
    ],
)
def test_repeated_blocks_are_the_transformer_blocks(name, count, kind):
    model = zoo.create(name) if name in zoo.list_models() else timm.create_model(name)
    blocks = repeated_blocks(model)
    assert len(blocks) == count and {type(b).__name__ for b in blocks} == {kind}


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.act = nn.ReLU()


def test_single_layers_are_not_blocks_and_inner_runs_win():
    stage = nn.Module()
    stage.blocks = nn.ModuleList([_Pair(), _Pair(), _Pair()])
    other = nn.Module()
    other.blocks = nn.ModuleList([_Pair(), _Pair()])
    model = nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]), nn.Sequential(stage, other))
    # the ModuleList of single Linear layers is skipped, the two stages hold the blocks
    assert repeated_blocks(model) == [*stage.blocks, *other.blocks]


def test_compile_blocks_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    model = zoo.create("favit_b0", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    expected = model(x)
    (grad_expected,) = torch.autograd.grad(expected.sum(), x)
    compile_blocks(model, backend="eager")
    assert all(
        type(b).__name__ == "OptimizedModule" or hasattr(b, "_compiled_call_impl")
        for b in repeated_blocks(model)
    )
    out = model(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, grad_expected)


def test_compile_blocks_refuses_a_model_without_blocks():
    with pytest.raises(ValueError, match="model: expected repeated blocks"):
        compile_blocks(nn.Linear(3, 3))


def _traced_operations(drop_path_rate: float) -> int:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = zoo.create("favit_b0", num_classes=5, drop_path_rate=drop_path_rate).train()
    compile_blocks(model, backend="eager")
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    return counters["stats"]["calls_captured"]


def test_stochastic_depth_rates_do_not_multiply_compilations():
    # 12 blocks with 12 different rates: traced per stage shape like without stochastic depth
    # (586 operations), not once per block (1,892 when the rates are compiled in)
    assert _traced_operations(0.1) <= 1.5 * _traced_operations(0.0)
