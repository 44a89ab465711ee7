"""The prompt family on encoder-decoder models (T5, BART): [P; x] on the encoder for prompt / P-tuning (PEFT as
the oracle), a decoder key/value prefix for prefix / P-tuning v2 (oracle: the base model run on real decoder
tokens whose keys and values the prefix copies), generation, labels, save / load."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer
from peft import PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from prompt_family import assert_close
from transformers import AutoModelForSeq2SeqLM, BartConfig, T5Config

import lmtune
from lmtune.checkpoint import save

CONFIGS = {
    "t5": lambda: T5Config(vocab_size=320, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
    "bart": lambda: BartConfig(vocab_size=320, d_model=32, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, max_position_embeddings=64),
}
METHODS = ["prompt", "p-tuning", "prefix", "p-tuning-v2"]
NVT = 3


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(CONFIGS[arch]()).eval()


def tuned(arch: str, method: str) -> lmtune.TunedModel:
    torch.manual_seed(5)
    return lmtune.apply(build(arch), {"name": method, "num_virtual_tokens": NVT})


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = torch.randint(3, 300, (2, 4), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("method", ["prompt", "p-tuning"])
def test_peft_loads_our_encoder_prompt(arch, method, tmp_path):
    ours = tuned(arch, method)
    save(ours, tmp_path)
    peft = PeftModel.from_pretrained(build(arch), tmp_path)
    with torch.no_grad():
        expected = peft(**inputs())
        got = ours(**inputs())
        base = build(arch)(**inputs())
    assert (expected.logits - base.logits).abs().max() > 1e-3
    assert_close(got.logits, expected.logits)
    assert_close(got.loss, expected.loss)


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("config", [
    PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=NVT, num_transformer_submodules=1),
    PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=NVT, num_transformer_submodules=1,
                        encoder_hidden_size=16)], ids=["prompt", "p-tuning"])
def test_we_load_a_peft_encoder_prompt(arch, config, tmp_path):
    build(arch).save_pretrained(tmp_path / "base")
    build_tokenizer().save_pretrained(tmp_path / "base")
    torch.manual_seed(7)
    peft = get_peft_model(build(arch), config)
    peft.save_pretrained(tmp_path / "adapter")
    ours, _ = lmtune.load(tmp_path / "adapter", base=str(tmp_path / "base"))
    with torch.no_grad():
        assert_close(ours(**inputs()).logits, peft(**inputs()).logits)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_decoder_prefix_acts_like_real_decoder_tokens(arch):
    """Copy the decoder's own keys/values of tokens z into a P-tuning v2 prefix: decoding y after the prefix must
    give the base model's logits for y after z (same positions, same attention)."""
    base = build(arch)
    x = inputs()["input_ids"][:1]
    z, y = torch.tensor([[5, 17, 42]]), torch.tensor([[7, 99, 12, 150]])
    with torch.no_grad():
        cache = base(input_ids=x, decoder_input_ids=z, use_cache=True).cache.self_attention_cache
        expected = base(input_ids=x, decoder_input_ids=torch.cat([z, y], dim=1)).logits[:, NVT:]
    rows = torch.stack([t for layer in cache.layers for t in (layer.keys[0], layer.values[0])])  # (2L, H, n, D)
    table = rows.permute(2, 0, 1, 3).reshape(NVT, -1)
    ours = tuned(arch, "p-tuning-v2")
    ours.model.prompt_encoder.load_table(table)
    with torch.no_grad():
        assert_close(ours(input_ids=x, decoder_input_ids=y).logits, expected)


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("method", METHODS)
def test_greedy_generation_equals_teacher_forced_argmax(arch, method):
    ours = tuned(arch, method)
    b = inputs()
    # No end token and no forced tokens (BART forces EOS at the end): every step is a plain argmax.
    out = ours.generate(b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=5, do_sample=False,
                        use_cache=True, eos_token_id=None, forced_eos_token_id=None, pad_token_id=0)
    assert out.shape == (2, 6)
    with torch.no_grad():
        logits = ours(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=out).logits
    assert torch.equal(logits[:, :-1].argmax(-1), out[:, 1:])


@pytest.mark.parametrize("method", METHODS)
def test_training_with_labels_lowers_the_loss_and_round_trips(method, tmp_path):
    ours = tuned("t5", method)
    optimizer = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=5e-2)
    ours.train()
    losses = []
    for _ in range(10):
        loss = ours(**inputs()).loss
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.05
    ours.eval()
    build("t5").save_pretrained(tmp_path / "base")
    build_tokenizer().save_pretrained(tmp_path / "base")
    save(ours, tmp_path / "run")
    loaded, _ = lmtune.load(tmp_path / "run", base=str(tmp_path / "base"))
    with torch.no_grad():
        assert_close(loaded(**inputs()).logits, ours(**inputs()).logits)


def test_a_peft_adapter_with_a_decoder_table_is_refused_with_one_line(tmp_path):
    """PEFT's seq2seq default (num_transformer_submodules=2) adds a decoder prompt lmtune does not use."""
    build("t5").save_pretrained(tmp_path / "base")
    build_tokenizer().save_pretrained(tmp_path / "base")
    get_peft_model(build("t5"), PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=NVT)).save_pretrained(
        tmp_path / "adapter")
    with pytest.raises(lmtune.LmtuneError, match="num_transformer_submodules=2") as err:
        lmtune.load(tmp_path / "adapter", base=str(tmp_path / "base"))
    assert "\n" not in str(err.value)
