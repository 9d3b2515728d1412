"""The small LM: registry, tokenizer and corpus, resumable training, export, shipped-weights loading, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import zoo
from zoo import checkpoints
from zoo.cli import main
from zoo.llm.corpus import clean_gcide, load_token_file, load_tokenizer, needle_tokens

from .conftest import TINY


def test_registered_architecture_is_a_hf_llama_with_gqa_and_8k_context():
    info = zoo.model_info("zoo_llama_9m")
    assert info["family"] == "llm" and 8.5e6 < info["params"] < 10e6
    assert info["params"] * 2 < 20e6  # bf16 weights fit the 20 MB limit
    model = zoo.create("zoo_llama_9m", **TINY)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    assert info["config"]["max_position_embeddings"] >= 8192 and info["config"]["num_key_value_heads"] == 2
    # the tied head is stored once, and loads back
    state = model.state_dict()
    assert "lm_head.weight" not in state and model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="num_key_value_heads"):
        zoo.create("zoo_llama_9m", num_key_value_heads=4)


def test_checkpoint_round_trip_gives_same_logits(tmp_path, tiny_llama):
    path = checkpoints.save(tiny_llama.state_dict(), tmp_path / "tiny.safetensors")
    reloaded = zoo.create("zoo_llama_9m", checkpoint=path, **TINY).eval()
    ids = torch.randint(3, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)


def test_cast_keeps_rotary_frequencies_exact():
    model = zoo.create("zoo_llama_9m", **TINY).eval()
    exact = model.model.rotary_emb.inv_freq.clone()
    ids = torch.randint(3, 300, (1, 6))
    positions = torch.tensor([[0, 1, 500, 2000, 4000, 8000]])
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=positions).logits
        model.to(torch.bfloat16)
        got = model(input_ids=ids, position_ids=positions).logits.float()
        model.to(torch.float32)
        back = model(input_ids=ids, position_ids=positions).logits
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, exact, rtol=0, atol=0)
    torch.testing.assert_close(back, want, rtol=1e-3, atol=1e-2)  # weights rounded to bf16 once
    # the cast model's phases stay exact: only weight rounding separates it from fp32
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    with torch.no_grad():  # rounding the frequencies as a plain cast would, errs far more at 8000
        model.to(torch.bfloat16)
        model.model.rotary_emb._forward_pre_hooks.clear()
        model.model.rotary_emb.inv_freq = exact.to(torch.bfloat16)
        rounded = model(input_ids=ids, position_ids=positions).logits.float()
    assert (rounded - want)[0, 3:].abs().max() > (got - want)[0, 3:].abs().max()


def test_gcide_cleaning_joins_entries_and_drops_markers():
    raw = (
        "00-database-info\n   header\n\nA \\A\\ (named)\n   The first letter.\n   [1913 Webster]\n\n"
        'Abandon \\A*ban"don\\, v. t. To cast\n      out. See {Ban}. [WordNet 1.5]\n'
    )
    text = clean_gcide(raw)
    assert text.splitlines() == [
        "A \\A\\ (named) The first letter.",
        'Abandon \\A*ban"don\\, v. t. To cast out. See Ban.',
    ]


def test_corpus_files_and_tokenizer_round_trip(tiny_corpus):
    folder, meta = tiny_corpus
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    assert tokenizer.get_vocab_size() == 300 == meta["vocab_size"]
    assert [tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [0, 1, 2]
    text = "And God said, Let there be light: ÆØ 12345 ~\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text  # byte-level: nothing is lost
    train, val = load_token_file(folder / "train.bin"), load_token_file(folder / "val.bin")
    assert train.size == meta["train_tokens"] and val.size == meta["val_tokens"] and (train == 2).sum() == 2
    needle, question, answer = needle_tokens(tokenizer, 31337)
    assert (
        question + answer == tokenizer.encode(" What is the secret number? The secret number is 31337.").ids
    )


@pytest.mark.skipif(shutil.which("bible") is None, reason="needs the bible-kjv program")
def test_bible_text_reads_verse_per_line():
    from zoo.llm.corpus import read_source

    text = read_source("bible")
    assert text.startswith("Genesis 1\n1 In the beginning God created the heaven and the earth.\n")
    assert "Amen." in text[-200:] and len(text) > 4_000_000


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    """Three steps of `zoo train lm`, then two more resumed from its checkpoint."""
    folder, _ = tiny_corpus
    out = tmp_path_factory.mktemp("lm_run")
    overrides = [f"{k}={v}" for k, v in TINY.items() if k != "vocab_size"]
    base = [
        "-q",
        "train",
        "lm",
        "--data",
        str(folder),
        "--out",
        str(out),
        "--seq-len",
        "32",
        "--long-seq-len",
        "64",
    ]
    base += ["--batch-tokens", "256", "--eval-every", "2", "--checkpoint-every", "1", "--needle-prob", "0.5"]
    base += ["--device", "cpu", "--set", *overrides]
    assert main([*base, "--max-steps", "3"]) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert main([*base, "--max-steps", "5"]) == 0
    return out, first, json.loads((out / "metrics.json").read_text())


def test_training_resumes_and_exports_shippable_files(trained):
    out, first, second = trained
    assert first["steps"] == 3 and second["steps"] == 5  # the second run continued, not restarted
    assert [h["step"] for h in second["history"]][: len(first["history"])] == [
        h["step"] for h in first["history"]
    ]
    name = "zoo_llama_9m.kjv_gcide"
    record = json.loads((out / f"{name}.json").read_text())
    assert record["kind"] == "zoo.llm.pretrained" and record["extra"]["tokenizer"] == f"{name}.tokenizer.json"
    assert record["config"]["vocab_size"] == 300 and record["metrics"]["val_ppl_32"] > 1.0
    weights = checkpoints.load(out / f"{name}.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values()) and "lm_head.weight" not in weights


def test_training_can_continue_from_exported_weights(trained, tiny_corpus, tmp_path):
    out, _, _ = trained
    folder, _ = tiny_corpus
    name = "zoo_llama_9m.kjv_gcide"
    overrides = [f"{k}={v}" for k, v in TINY.items() if k != "vocab_size"]
    args = ["-q", "train", "lm", "--data", str(folder), "--out", str(tmp_path), "--seq-len", "32"]
    args += ["--long-seq-len", "64", "--batch-tokens", "256", "--max-steps", "1", "--lr", "1e-12"]
    args += ["--device", "cpu", "--init", str(out / f"{name}.safetensors"), "--set", *overrides]
    assert main(args) == 0
    start = checkpoints.load(out / f"{name}.safetensors")
    after = checkpoints.load(tmp_path / f"{name}.safetensors")
    assert start.keys() == after.keys()
    for key in start:  # one step at a negligible learning rate: the weights it started from
        torch.testing.assert_close(after[key], start[key], rtol=0, atol=0)


def test_exported_record_registers_as_pretrained_weights(trained):
    from zoo import registry
    from zoo.llm.model import load_pretrained_tokenizer, register_shipped_weights

    out, _, _ = trained
    try:
        assert register_shipped_weights(out) == ["zoo_llama_9m.kjv_gcide"]
        model = zoo.create("zoo_llama_9m.kjv_gcide", pretrained=True)
        saved = checkpoints.load(out / "zoo_llama_9m.kjv_gcide.safetensors")
        torch.testing.assert_close(
            model.model.embed_tokens.weight, saved["model.embed_tokens.weight"].float()
        )
        assert load_pretrained_tokenizer("zoo_llama_9m.kjv_gcide").get_vocab_size() == 300
    finally:
        registry.get_entry("zoo_llama_9m")[0].tags.pop("kjv_gcide", None)


def test_eval_prefill_and_pattern_search_commands_run_on_the_trained_model(trained, tiny_corpus, tmp_path):
    out, _, _ = trained
    folder, _ = tiny_corpus
    common = ["--model", "zoo_llama_9m", "--checkpoint", str(out / "zoo_llama_9m.kjv_gcide.safetensors")]
    common += [
        "--tokenizer",
        str(folder / "tokenizer.json"),
        "--data",
        str(folder),
        "--seq-len",
        "96",
        "--device",
        "cpu",
    ]
    common += ["--set", *[f"{k}={v}" for k, v in TINY.items()]]
    config = tmp_path / "patterns.json"
    assert (
        main(["-q", "train", "minference-config", *common, "--block-size", "16", "--out", str(config)]) == 0
    )
    thresholds = tmp_path / "thresholds.json"
    tau_args = ["--block-size", "16", "--stride", "4", "--samples", "2", "--out", str(thresholds)]
    assert main(["-q", "train", "xattention-thresholds", *common, *tau_args]) == 0
    method_config = json.dumps(
        {
            "xattention": {"block_size": 16, "stride": 4},
            "pbs": {"block_size": 16, "segment_size": 32},
            "minference_block_sparse": {"block_size": 16, "topk": 3},
        }
    )
    args = ["-q", "eval", "prefill", *common, "--methods", "xattention", "pbs", "minference_block_sparse"]
    args += ["--method-config", method_config, "--minference-config", str(config), "--needle-trials", "1"]
    args += ["--xattention-config", str(thresholds)]
    args += [
        "--needle-length",
        "128",
        "--needle-depths",
        "0.5",
        "--synthetic-len",
        "256",
        "--continuation-tokens",
        "20",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    result = json.loads((tmp_path / "prefill_eval.json").read_text())
    assert result["command"] == " ".join(["zoo", *args]) and result["lm"]["continuation_tokens"] == 20
    assert all("continuation_ppl_ratio" in row for row in result["lm"]["methods"].values())
    assert set(result["lm"]["methods"]) == {
        "xattention",
        "pbs",
        "minference_block_sparse",
        "minference_searched",
        "xattention_profiled",
    }
    assert set(result["synthetic"]["methods"]) == {"xattention", "pbs", "minference_block_sparse"}
    assert all(len(row["layers"]) == 2 for row in result["lm"]["methods"].values())
    assert "needle" in result["lm"]["dense"] and "targets" in result["lm"]


def test_demo_runs():
    from zoo.llm.commands import demo

    demo(None)
