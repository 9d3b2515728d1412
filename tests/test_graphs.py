"""``zoo.graphs.GraphedCall``: CUDA-graph replay equals the function, per input signature; CPU passes through."""

from __future__ import annotations

import pytest
import torch

from zoo.graphs import GraphedCall


def affine_gelu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x @ w + 1.0)


def test_cpu_runs_the_function():
    calls = []
    graphed = GraphedCall(lambda x: calls.append(1) or x * 2)
    x = torch.randn(3, 4)
    assert torch.equal(graphed(x), x * 2) and len(calls) == 1


@pytest.mark.parametrize(
    "args, match",
    [
        ((), "tensors: expected one or more tensors"),
        ((torch.ones(2), 3.0), "tensors: expected one or more tensors, got"),
    ],
)
def test_bad_calls_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        GraphedCall(lambda *a: a[0])(*args)


def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match="fn: expected a callable"):
        GraphedCall(3)
    with pytest.raises(ValueError, match="warmup: expected an integer >= 1"):
        GraphedCall(affine_gelu, warmup=0)


@pytest.mark.gpu
def test_cuda_replay_equals_the_function_for_new_inputs_and_shapes():
    graphed = GraphedCall(affine_gelu)
    w = torch.randn(16, 8, device="cuda")
    outs = []
    for rows in (5, 5, 7, 5):  # two signatures; the second 5-row call replays the first graph
        x = torch.randn(rows, 16, device="cuda")
        with torch.no_grad():
            got = graphed(x, w)
        torch.testing.assert_close(got, affine_gelu(x, w))
        outs.append(got)
    assert len(graphed._graphs) == 2
    # results are copies: a later replay does not change an earlier result
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.gpu
def test_cuda_calls_with_gradients_enabled_run_the_function():
    graphed = GraphedCall(affine_gelu)
    x = torch.randn(4, 16, device="cuda", requires_grad=True)
    graphed(x, torch.randn(16, 8, device="cuda")).sum().backward()
    graphed(torch.randn(4, 16, device="cuda"), torch.randn(16, 8, device="cuda"))  # grad mode, no grad inputs
    assert x.grad is not None and not graphed._graphs
