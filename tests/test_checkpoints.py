import argparse
import os
import pickle

import pytest
import torch

from zoo import checkpoints
from zoo.checkpoints import CheckpointError


def _state():
    return {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3), "b.weight": torch.randn(2, 3)}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(3, 2, bias=False)


def _assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_round_trip_every_format(tmp_path, suffix):
    state = _state()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        checkpoints.save(state, path)
    else:
        torch.save(state, path)
    _assert_same(checkpoints.load(path), state)


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_unwraps_training_checkpoints_and_strips_prefixes(tmp_path, wrapper, prefix):
    state = _state()
    blob = {
        wrapper: {prefix + k: v for k, v in state.items()},
        "args": argparse.Namespace(lr=1e-3, model="favit_b0"),
        "epoch": 299,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
    }
    path = tmp_path / "ckpt.pth"
    torch.save(blob, path)
    _assert_same(checkpoints.load(path), state)


def test_ema_weights_on_request(tmp_path):
    state, ema = _state(), _state()
    torch.save({"state_dict": state, "state_dict_ema": ema}, tmp_path / "c.pth")
    _assert_same(checkpoints.load(tmp_path / "c.pth"), state)
    _assert_same(checkpoints.load(tmp_path / "c.pth", use_ema=True), ema)
    torch.save({"state_dict": state}, tmp_path / "d.pth")
    with pytest.raises(CheckpointError, match="use_ema"):
        checkpoints.load(tmp_path / "d.pth", use_ema=True)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model": {"w": torch.zeros(1)}, "hook": _Exploit(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        checkpoints.load(path)
    assert not marker.exists()


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoints.load(tmp_path / "none.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="expected a .safetensors"):
        checkpoints.load(tmp_path / "w.npz")
    (tmp_path / "w.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        checkpoints.load(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="expected a path ending in .safetensors"):
        checkpoints.save(_state(), tmp_path / "w.pt")


def test_save_handles_shared_and_noncontiguous_tensors(tmp_path):
    base = torch.randn(4, 4)
    state = {"x": base, "y": base, "t": base.t()}
    path = checkpoints.save(state, tmp_path / "s.safetensors")
    got = checkpoints.load(path)
    _assert_same(got, {k: v.contiguous() for k, v in state.items()})


def test_strict_report_names_every_problem():
    net = Net()
    state = dict(net.state_dict())
    state.pop("a.bias")
    state["c.weight"] = torch.zeros(1)
    state["b.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as err:
        checkpoints.load_into(net, state)
    text = str(err.value)
    assert "missing from the checkpoint (1):\n    a.bias" in text
    assert "unexpected in the checkpoint (1):\n    c.weight" in text
    assert "b.weight: (5, 5) vs (2, 3)" in text


def test_non_strict_loads_what_matches():
    net, src = Net(), Net()
    state = dict(src.state_dict())
    state.pop("a.bias")
    report = checkpoints.load_into(net, state, strict=False)
    assert report.missing == ["a.bias"] and not report.unexpected
    assert torch.equal(net.a.weight, src.a.weight)
    assert not torch.equal(net.a.bias, src.a.bias)


def test_filter_fn_maps_upstream_names():
    net, src = Net(), Net()
    upstream = {k.replace("a.", "layer1."): v for k, v in src.state_dict().items()}
    checkpoints.load_into(
        net, upstream, filter_fn=lambda s, m: {k.replace("layer1.", "a."): v for k, v in s.items()}
    )
    assert torch.equal(net.a.weight, src.a.weight)
