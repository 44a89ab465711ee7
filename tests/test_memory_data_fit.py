"""The end-of-run memory check compares the measured peak with an estimate for the lengths the run had."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from lmtune import train
from lmtune.config import load_config
from lmtune.data import Example, Pair
from lmtune.data.format import IGNORE
from lmtune.data.pack import Packed
from lmtune.memory import MemoryPlan, estimate, report
from lmtune.train import run


def _example(tokens: int, learned: int) -> Example:
    # The last `learned` positions carry labels; tokens > learned, so none is the first (never a target).
    labels = [IGNORE] * (tokens - learned) + list(range(learned))
    return Example(list(range(tokens)), labels)


def test_longest_batch_bounds_padding_and_labels_by_hand():
    items = [_example(5, 2), _example(9, 3), _example(4, 3)]
    # Rows pad to the longest (9); the 2 rows with most learned positions hold 3 + 3 of 2 x 8 positions.
    assert report.longest_batch(items, batch_size=2) == (9, 6 / 16)
    pairs = [Pair(_example(7, 4), _example(4, 2)), Pair(_example(6, 1), _example(6, 5))]
    # One micro-batch of 1 pair holds 2 rows: the 2 most learned rows are 5 + 4, of 2 x 6 positions.
    assert report.longest_batch(pairs, batch_size=1) == (7, 9 / 12)
    packed = [Packed([_example(4, 2), _example(6, 3)]), Packed([_example(3, 1)])]
    assert report.longest_batch(packed, batch_size=2) == (10, 6 / 18)


def test_run_compares_its_peak_with_the_batches_it_trained_on(model_dir, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": " ok" * (i + 1)}) + "\n"
                            for i in range(4)))
    cfg = load_config(None, [f"model.name={model_dir}", f"data.train={data}", "method=lora", "data.max_length=64",
                             f"output_dir={tmp_path / 'run'}", "train.device=cpu", "train.steps=2",
                             "train.batch_size=4"])
    seen = []  # every training batch, as the collate function made it (the oracle for length and labels)
    real = train._collate_fn

    def recording(*args):
        collate = real(*args)
        return lambda rows: seen.append(collate(rows)) or seen[-1]

    monkeypatch.setattr(train, "_collate_fn", recording)
    run(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    width = max(b["input_ids"].shape[1] for b in seen)
    assert width < 64  # short data: the worst case would pad every row to 64
    batch = max(seen, key=lambda b: b["input_ids"].shape[1])  # 4 examples, batch 4: one batch holds them all
    learned = int((batch["labels"][:, 1:] != IGNORE).sum()) / (4 * (width - 1))
    plan = report.plan_from_config(cfg)
    expected = estimate(replace(plan, seq_len=width, labelled_fraction=learned)).per_device
    assert summary["predicted_peak_bytes"] == expected
    assert summary["predicted_worst_case_bytes"] == estimate(plan).per_device > expected
    assert f"4 x {width} tokens" in summary["predicted_peak_for"]
    if summary["measured_peak_bytes"] > 0:
        md = (tmp_path / "run" / "summary.md").read_text()
        assert f"4 x {width} tokens" in md and "worst case at data.max_length" in md


def _file_resident(path: str) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line
            inside = line.rstrip().endswith(path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def test_a_frozen_embedding_no_head_reads_is_resident_only_where_looked_up(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmtune.models import load_weights

    vocab, hidden = 65536, 128  # a 32 MiB table of 512-byte rows
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    model = load_weights(str(tmp_path / "m"))  # lmtune's loader: the weights stay mapped from the file
    weights = str(tmp_path / "m" / "model.safetensors")
    ids = (5, 6, 7, 30000, 30001, 60000)  # three places in the table
    before = _file_resident(weights)
    with torch.no_grad():
        model.get_input_embeddings()(torch.tensor(ids))
    grown = _file_resident(weights) - before  # the oracle: what the kernel made resident
    whole = vocab * hidden * 4
    plan = MemoryPlan(model=str(tmp_path / "m"), batch_size=1, seq_len=16)
    kept = whole - (estimate(plan).per_device - estimate(replace(plan, token_ids=ids)).per_device)
    assert 0 < grown <= kept < whole / 2
    # Loaded in bf16 from this fp32 file, the embedding is a converted copy, resident whole: nothing is taken off
    # (the file's dtype is read before the traced model is built, which sets the config's to the load dtype).
    bf16 = replace(plan, precision="bf16")
    assert estimate(replace(bf16, token_ids=ids)).weights == estimate(bf16).weights
