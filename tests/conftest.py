import pytest
import torch

from zoo import checkpoints, registry


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


class TinyNet(torch.nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 3):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, width)
        self.head = torch.nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.fc1(x)))


@pytest.fixture
def tiny_arch(tmp_path):
    """A throw-away architecture with one shipped tag, removed after the test."""
    registry._load_families()

    def upstream_filter(state, model):
        return {k.replace("classifier.", "head."): v for k, v in state.items()}

    registry.register_model(
        "zz_tinynet",
        family="vision",
        config=dict(width=8, num_classes=3),
        paper=("A tiny net", "0000.00000"),
        checkpoint_filter_fn=upstream_filter,
        eval_command="zoo eval image",
    )(TinyNet)
    model = TinyNet(width=8, num_classes=5)
    path = checkpoints.save(model.state_dict(), tmp_path / "zz_tinynet.toy.safetensors")
    registry.register_pretrained(
        "zz_tinynet",
        registry.PretrainedTag(
            tag="toy",
            file=str(path),
            sha256=registry.sha256_of(path),
            dataset="random",
            metrics={"top1": 12.5},
            config=dict(num_classes=5),
        ),
    )
    yield model
    registry._ENTRIES.pop("zz_tinynet", None)
