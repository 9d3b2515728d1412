"""``zoo train text`` / ``zoo eval text`` end to end on tiny tasks; training lowers the loss; resume is exact."""

import json

import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo.cli import main
from zoo.text.eval import evaluate_model
from zoo.text.lra import ListOps, collate
from zoo.text.train import TrainConfig, parse_options, train

TASK = dict(num_train=48, num_val=16, num_test=16, min_length=20, max_length=64, workers=1)
MODEL = dict(max_position_embeddings=64, hidden_dropout_prob=0.0)


@pytest.mark.parametrize("mixer", ["ponet", "sdpa", "fnet"])
def test_a_few_steps_lower_the_loss(mixer):
    torch.manual_seed(0)
    data = ListOps(**TASK).split("train")
    batch = collate([data[i] for i in range(16)], 64)
    model = zoo.create("ponet_lra_listops", mixer=mixer, **MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses


def _config(out, **kw):
    base = dict(
        task="listops",
        out=str(out),
        steps=12,
        batch_size=8,
        lr=1e-3,
        warmup=2,
        eval_every=6,
        device="cpu",
        num_workers=0,
        task_options=TASK,
        model_options=MODEL,
    )
    return TrainConfig(**{**base, **kw})


def test_train_writes_results_and_resume_is_exact(tmp_path):
    straight = train(_config(tmp_path / "straight"))
    run = tmp_path / "straight" / "listops_ponet"
    assert {p.name for p in run.iterdir()} >= {
        "best.safetensors",
        "checkpoint.pt",
        "results.json",
        "history.json",
    }
    saved = json.loads((run / "results.json").read_text())
    assert saved["steps"] == 12 and [h["step"] for h in saved["history"]] == [6, 12]
    assert saved["task"]["task"] == "listops" and saved["mixer"] == "ponet" and 0 <= saved["test_acc"] <= 1
    assert saved["test_examples"] == 16 and saved["model_config"]["segment_num"] == 64

    # 6 steps, then resume to 12: the same weights as the straight run
    train(_config(tmp_path / "resumed", steps=12, max_minutes=0.0))  # stops right after step 1
    first = json.loads((tmp_path / "resumed" / "listops_ponet" / "results.json").read_text())
    assert first["stopped_by_time"] and first["steps"] == 1
    resumed = train(_config(tmp_path / "resumed", resume=True))
    assert resumed["steps"] == 12
    a = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "listops_ponet" / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # zoo eval text on the best weights reproduces the test accuracy
    ev = evaluate_model(
        "ponet_lra_listops",
        checkpoint=str(run / "best.safetensors"),
        device="cpu",
        task_options=TASK,
        model_options=MODEL,
        out=str(tmp_path / "eval.json"),
    )
    assert (
        ev["acc"] == straight["test_acc"]
        and json.loads((tmp_path / "eval.json").read_text())["examples"] == 16
    )


def test_cli_train_several_mixers_eval_and_tag(tmp_path, capsys):
    options = ["--task-option", *[f"{k}={v}" for k, v in TASK.items()]]
    options += ["--model-option", *[f"{k}={v}" for k, v in MODEL.items()]]
    code = main(
        ["train", "text", "--task", "listops", "--mixer", "ponet,fnet", "--steps", "4", "--batch-size", "8"]
        + ["--eval-every", "4", "--workers", "0", "--device", "cpu", "--tag", "tiny", "--out", str(tmp_path)]
        + options
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "ponet" in table and "fnet" in table and "test acc" in table
    summary = json.loads((tmp_path / "listops_summary.json").read_text())
    assert set(summary["runs"]) == {"ponet", "fnet"}
    tags = json.loads((tmp_path / "text_tags.json").read_text())
    assert [(t["tag"], t["config"].get("mixer")) for t in tags] == [("tiny", None), ("tiny_fnet", "fnet")]
    entry = tags[0]
    weights = tmp_path / entry["file"]
    assert weights.is_file() and entry["command"].startswith("zoo train text --task listops")
    from zoo.registry import sha256_of

    assert sha256_of(weights) == entry["sha256"]
    assert set(load_file(str(weights))) == set(zoo.create("ponet_lra_listops", **MODEL).state_dict())

    code = main(
        [
            "eval",
            "text",
            "--model",
            "ponet_lra_listops",
            "--checkpoint",
            str(tmp_path / "listops_ponet" / "best.safetensors"),
        ]
        + ["--device", "cpu", "--limit", "8", "--out", str(tmp_path / "e.json")]
        + options
    )
    assert code == 0 and "accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["examples"] == 8


def test_training_errors_are_user_errors(tmp_path, capsys):
    assert parse_options(["a=1", "b=2.5", "c=true", "d=none", "e=x"]) == dict(
        a=1, b=2.5, c=True, d=None, e="x"
    )
    with pytest.raises(ValueError, match="option: expected KEY=VALUE"):
        parse_options(["oops"])
    with pytest.raises(ValueError, match="max_position_embeddings 16 < task length 64"):
        train(_config(tmp_path, model_options=dict(max_position_embeddings=16)))
    code = main(
        [
            "train",
            "text",
            "--task",
            "listops",
            "--batch-size",
            "1000",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ]
        + ["--workers", "0", "--task-option", *[f"{k}={v}" for k, v in TASK.items()]]
    )
    assert code == 2 and "batch_size: 1000 is larger than the training split" in capsys.readouterr().err


def test_tag_manifest_registers_shipped_weights(tmp_path, monkeypatch, capsys):
    import zoo.text
    from zoo import registry

    options = ["--task-option", *[f"{k}={v}" for k, v in TASK.items()]]
    options += ["--model-option", *[f"{k}={v}" for k, v in MODEL.items()]]
    common = ["--steps", "3", "--batch-size", "8", "--eval-every", "3", "--workers", "0", "--device", "cpu"]
    assert (
        main(
            ["train", "text", "--task", "listops", "--tag", "tiny", "--out", str(tmp_path), *common, *options]
        )
        == 0
    )
    monkeypatch.setattr(registry, "weights_dir", lambda: tmp_path)
    monkeypatch.setattr(zoo.text, "weights_dir", lambda: tmp_path)
    entry = registry.get_entry("ponet_lra_listops")[0]
    try:
        zoo.text._register_shipped_weights()
        assert "ponet_lra_listops.tiny" in zoo.list_models("ponet_lra*", pretrained=True)
        model = zoo.create("ponet_lra_listops.tiny", pretrained=True)
        best = load_file(str(tmp_path / "listops_ponet" / "best.safetensors"))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in best.items())
        assert model.zoo_config["max_position_embeddings"] == 64  # the tag's config came with it
        capsys.readouterr()
        assert (
            main(["eval", "text", "--model", "ponet_lra_listops.tiny", "--device", "cpu", *options[:7]]) == 0
        )
        assert "ponet_lra_listops.tiny on listops/test" in capsys.readouterr().out
    finally:
        entry.tags.pop("tiny", None)


def test_standalone_text_commands_entry_point(tmp_path, capsys):
    from zoo.text import commands

    with pytest.raises(SystemExit) as exc:
        commands.main(["train", "text", "--help"])
    assert exc.value.code == 0 and "--mixer" in capsys.readouterr().out
    args = ["train", "text", "--steps", "2", "--batch-size", "8", "--eval-every", "2", "--workers", "0"]
    args += [
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
        "--task-option",
        *[f"{k}={v}" for k, v in TASK.items()],
    ]
    assert commands.main(args) == 0
    assert json.loads((tmp_path / "listops_ponet" / "results.json").read_text())["steps"] == 2
    assert commands.main(["eval", "text", "--model", "no_such_model"]) == 2
    assert "unknown model" in capsys.readouterr().err
