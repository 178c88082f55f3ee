"""Residual-stream hooks on stand-in blocks (no model): both output conventions of a decoder block.
The same hooks on tiny random models are in tests/integration/test_hooks.py."""

import pytest
import torch

from core.hooks import ablate, block_hidden, capture, steer


class TupleBlock(torch.nn.Module):
    """A block in the style of older transformers: returns ``(hidden, attention_weights)`` (here the input
    stands in for the weights)."""

    def __init__(self, width):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.linear(x), x


class TensorBlock(TupleBlock):
    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("block", [TupleBlock, TensorBlock])
def test_hooks_handle_tuple_and_bare_tensor_outputs(block):
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([block(8), block(8)])
    x = torch.randn(2, 3, 8)

    def run():
        h = x
        for layer in layers:
            h = block_hidden(layer(h))
        return h

    plain = run()
    vector = torch.randn(8)
    with capture(layers, [0]) as records:
        run()
    assert torch.allclose(records[0][0], block_hidden(layers[0](x)))
    with steer(layers, {1: vector}, 2.0):
        steered = run()
    assert torch.allclose(steered, plain + 2.0 * vector, atol=1e-6)
    with ablate(layers, {1: vector}):
        ablated = run()
    assert torch.allclose(ablated @ (vector / vector.norm()), torch.zeros(2, 3), atol=1e-5)
    # Each hook hands the next module what the block itself returns: a tuple stays a tuple with its
    # other entries untouched, a bare tensor stays a bare tensor.
    for hooked in (capture(layers, [0]), steer(layers, {0: vector}, 2.0), ablate(layers, {0: vector})):
        with hooked:
            output = layers[0](x)
        if block is TupleBlock:
            assert isinstance(output, tuple) and len(output) == 2 and output[1] is x
        else:
            assert isinstance(output, torch.Tensor)
