"""Launch-count regression guard for FaViT (arXiv 2312.08614): the number of aten operations that
run kernels in one forward + backward of favit_b0 (and of one FaSA layer) must not grow.

Eager training on a GPU is bound by kernel launches (thousands of small kernels per step), so
the count of dispatched non-view aten operations is the quantity to keep down; it is counted
with a ``TorchDispatchMode`` on CPU, with the CUDA head-dim padding switched on. No timing.
"""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import zoo
from zoo.layers.fasa import FactorizationSelfAttention

# operations that only create views or allocate without running a kernel
NO_KERNEL = {"detach", "empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "lift_fresh"}

# counts of the current fast path on torch 2.14 (1,297 and 90; before the branches were batched:
# 1,537 and 114; with the branches' linear layers also batched (baddbmm), 1,233 and 86, but that
# product's weight gradient cost more GPU time than the launches it saved), with 5% room for
# other torch versions' decompositions
MAX_FAVIT_B0_OPS = round(1297 * 1.05)
MAX_FASA_LAYER_OPS = round(90 * 1.05)


class KernelOpCounter(TorchDispatchMode):
    """Counts dispatched aten operations, leaving out views and plain allocations."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in NO_KERNEL):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_forward_backward(model: torch.nn.Module, *inputs) -> KernelOpCounter:
    for module in model.modules():
        if isinstance(module, FactorizationSelfAttention):
            module.pad_head_dim = True  # what runs on CUDA
    model(*inputs).sum().backward()  # fills index caches
    model.zero_grad(set_to_none=True)
    with KernelOpCounter() as counter:
        model(*inputs).sum().backward()
    return counter


def test_favit_b0_forward_backward_runs_no_more_operations():
    torch.manual_seed(0)
    model = zoo.create("favit_b0", num_classes=10)
    counter = count_forward_backward(model, torch.randn(2, 3, 64, 64))
    assert counter.total <= MAX_FAVIT_B0_OPS, counter.counts.most_common(12)
    # what the count stands for: one forward and one backward of every layer
    assert counter.counts["native_layer_norm"] == counter.counts["native_layer_norm_backward"] > 0


@pytest.mark.parametrize("dim,heads,sr,size,limit", [(64, 2, 4, 12, "MAX_FASA_LAYER_OPS")])
def test_fasa_layer_forward_backward_runs_no_more_operations(dim, heads, sr, size, limit):
    torch.manual_seed(0)
    layer = FactorizationSelfAttention(dim, heads, sr)
    x = torch.randn(2, size * size, dim, requires_grad=True)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x, (size, size))

    counter = count_forward_backward(Wrapped(), x)
    assert counter.total <= globals()[limit], counter.counts.most_common(12)


def test_channels_last_gradients_keep_their_parameters_strides():
    """Multi-tensor optimizer kernels need every gradient laid out like its parameter (else one
    kernel per parameter and operation for the whole model)."""
    model = zoo.create("favit_b0", num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    mismatched = [
        name for name, p in model.named_parameters() if p.grad is None or p.grad.stride() != p.stride()
    ]
    assert mismatched == []
