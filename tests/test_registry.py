import pytest
import torch

import zoo
from zoo import registry


def test_create_applies_default_config_and_overrides(tiny_arch):
    model = zoo.create("zz_tinynet")
    assert model.fc1.out_features == 8 and model.head.out_features == 3
    model = zoo.create("zz_tinynet", width=16)
    assert model.fc1.out_features == 16
    assert model.zoo_config == {"width": 16, "num_classes": 3}


def test_unknown_override_is_a_clear_error(tiny_arch):
    with pytest.raises(
        ValueError, match=r"unknown config override\(s\) \['widht'\].*valid keys: num_classes, width"
    ):
        zoo.create("zz_tinynet", widht=16)


def test_unknown_name_lists_closest(tiny_arch):
    with pytest.raises(ValueError, match="closest: zz_tinynet"):
        zoo.create("zz_tinynte")
    with pytest.raises(ValueError, match="no pretrained tag 'nope'.*tags: toy"):
        zoo.create("zz_tinynet.nope")


def test_pretrained_loads_exact_weights_and_tag_config(tiny_arch):
    model = zoo.create("zz_tinynet", pretrained=True)
    assert model.head.out_features == 5  # the tag's config
    for name, value in tiny_arch.state_dict().items():
        assert torch.equal(model.state_dict()[name], value)
    # a tag without pretrained=True gives the tag's config but fresh weights
    fresh = zoo.create("zz_tinynet.toy")
    assert fresh.head.out_features == 5
    assert not torch.equal(fresh.fc1.weight, tiny_arch.fc1.weight)


def test_pretrained_sha256_is_checked(tiny_arch):
    tag = registry._ENTRIES["zz_tinynet"].tags["toy"]
    path = tag.path()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        zoo.create("zz_tinynet", pretrained=True)


def test_checkpoint_goes_through_filter_fn(tiny_arch, tmp_path):
    upstream = {k.replace("head.", "classifier."): v for k, v in tiny_arch.state_dict().items()}
    path = tmp_path / "upstream.pth"
    torch.save({"model": upstream, "epoch": 3}, path)
    model = zoo.create("zz_tinynet", checkpoint=path, num_classes=5)
    assert torch.equal(model.head.weight, tiny_arch.head.weight)


def test_no_weights_for_arch_without_tags(tiny_arch):
    registry._ENTRIES["zz_tinynet"].tags.clear()
    with pytest.raises(ValueError, match="no pretrained weights"):
        zoo.create("zz_tinynet", pretrained=True)


def test_list_models_and_info(tiny_arch):
    assert "zz_tinynet" in zoo.list_models("zz_*")
    assert zoo.list_models("zz_*", pretrained=True) == ["zz_tinynet.toy"]
    assert "zz_tinynet" in zoo.list_models(family="vision")
    assert "zz_tinynet" not in zoo.list_models(family="text")
    with pytest.raises(ValueError, match="family"):
        zoo.list_models(family="audio")
    info = zoo.model_info("zz_tinynet")
    assert info["family"] == "vision"
    assert info["params"] == 4 * 8 + 8 + 8 * 3 + 3
    assert info["pretrained"]["toy"]["metrics"] == {"top1": 12.5}
    assert zoo.model_info("zz_tinynet.toy")["config"]["num_classes"] == 5


def test_register_rejects_bad_names_and_configs(tiny_arch):
    with pytest.raises(ValueError, match="must not contain"):
        registry.register_model("a.b", family="vision", config={})
    with pytest.raises(ValueError, match="unknown keys"):
        registry.register_pretrained(
            "zz_tinynet",
            registry.PretrainedTag(tag="x", file="x", sha256="0", dataset="d", config={"depth": 3}),
        )
