"""Houlsby / Pfeiffer bottleneck adapters. PEFT has no such method, so the oracle is a second, hand-written
implementation: forward hooks on the untouched base model that add `h + W_up f(W_down h + b_down) + b_up` to
the outputs of the modules named below (written out per architecture here, not taken from lmtune).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _cli import CHAT, in_process_cli
from conftest import ARCHS, build_model, logits, trainable
from safetensors.torch import load_file

import lmtune
from lmtune.checkpoint import save
from lmtune.inference import generate
from lmtune.methods.adapter import AdapterSite

ATOL = 1e-5
# Per block: (attention output projection, feed-forward block), as each architecture's modeling file has them.
SITES = {
    "llama": ("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp"),
    "qwen2": ("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp"),
    "mistral": ("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp"),
    "gpt2": ("transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp"),
    "gpt_neox": ("gpt_neox.layers.{i}.attention.dense", "gpt_neox.layers.{i}.mlp"),
}
NORMS = {  # every normalisation weight / bias of the 2-layer test models
    "llama": ["model.layers.{i}.input_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight",
              "model.norm.weight"],
    "gpt2": ["transformer.h.{i}.ln_1.weight", "transformer.h.{i}.ln_1.bias", "transformer.h.{i}.ln_2.weight",
             "transformer.h.{i}.ln_2.bias", "transformer.ln_f.weight", "transformer.ln_f.bias"],
}
NONLINEARITY = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
HIDDEN, LAYERS = 32, 2


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-3, "the adapters changed nothing: the comparison would be vacuous"


def sites(arch: str, placement: str = "houlsby") -> list[str]:
    attention, ffn = SITES[arch]
    chosen = [attention, ffn] if placement == "houlsby" else [ffn]
    return [site.format(i=i) for i in range(LAYERS) for site in chosen]


def norms(arch: str) -> set[str]:
    return {name.format(i=i) for name in NORMS[arch] for i in range(LAYERS)}


def lmtune_adapter(arch: str, **options) -> lmtune.TunedModel:
    torch.manual_seed(3)
    return lmtune.apply(build_model(arch), {"name": "adapter", "init": "random", **options},
                        base_name=f"tiny-{arch}")


def hooked_oracle(arch: str, tuned: lmtune.TunedModel, placement: str, nonlinearity: str):
    """The base model with hooks doing the adapter math by hand, on copies of `tuned`'s adapter weights.

    Returns the model and its adapter tensors keyed like lmtune's parameters.
    """
    model = build_model(arch)
    ours = dict(tuned.model.named_parameters())
    act = NONLINEARITY[nonlinearity]
    tensors: dict[str, torch.Tensor] = {}
    for site in sites(arch, placement):
        w = {part: ours[f"{site}.adapter.{part}"].detach().clone().requires_grad_(True)
             for part in ("down.weight", "down.bias", "up.weight", "up.bias")}
        tensors.update({f"{site}.adapter.{part}": t for part, t in w.items()})

        def hook(module, inputs, h, w=w):
            h = h[0] if isinstance(h, tuple) else h
            return h + act(h @ w["down.weight"].T + w["down.bias"]) @ w["up.weight"].T + w["up.bias"]

        model.get_submodule(site).register_forward_hook(hook)
    return model, tensors


# --- the adapter math and where it goes, against the hand-written oracle ---------------------------

@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_and_gradients_match_the_hand_written_oracle(arch, placement):
    tuned = lmtune_adapter(arch, placement=placement, bottleneck=4, train_norms=False)
    oracle, tensors = hooked_oracle(arch, tuned, placement, "gelu")
    assert {name.removesuffix(".adapter") for name, m in tuned.model.named_modules()
            if isinstance(m, AdapterSite)} == set(sites(arch, placement))
    ids, mask, labels = batch()
    ours = tuned(ids, mask, labels)
    out = oracle(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(ours.logits, out.logits)
    assert_differs(ours.logits, logits(build_model(arch)))
    ours.loss.backward()
    out.loss.backward()
    grads = {name: p.grad for name, p in tuned.model.named_parameters() if p.requires_grad}
    assert grads.keys() == tensors.keys()
    for name, grad in grads.items():
        expected = tensors[name].grad
        assert expected.abs().max() > 0, name
        assert_close(grad, expected, atol=ATOL * max(1.0, expected.abs().max().item()))


@pytest.mark.parametrize("nonlinearity", list(NONLINEARITY))
def test_each_nonlinearity_matches_the_oracle(nonlinearity):
    tuned = lmtune_adapter("llama", nonlinearity=nonlinearity)
    oracle, _ = hooked_oracle("llama", tuned, "houlsby", nonlinearity)
    assert_close(logits(tuned), logits(oracle))
    if nonlinearity != "gelu":
        other = lmtune_adapter("llama", nonlinearity="gelu")
        assert_differs(logits(other), logits(tuned))


# --- initialisation --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_untrained_adapters_leave_logits_unchanged(arch):
    tuned = lmtune.apply(build_model(arch), "adapter")
    assert_close(logits(tuned), logits(build_model(arch)), atol=0)
    downs = [m.adapter.down.weight for m in tuned.model.modules() if isinstance(m, AdapterSite)]
    assert all(w.abs().max() > 0 for w in downs)  # only W_up (and the biases) start at zero


def test_houlsby_init_is_near_identity_and_bf16_identity_is_exact():
    tuned = lmtune.apply(build_model("llama"), {"name": "adapter", "init": "houlsby"})
    weights = [m.adapter.up.weight for m in tuned.model.modules() if isinstance(m, AdapterSite)]
    assert all(0 < w.abs().max() <= 2e-3 for w in weights)  # truncated at two standard deviations
    assert_close(logits(tuned), logits(build_model("llama")), atol=1e-4)
    base = build_model("llama").to(torch.bfloat16)
    tuned = lmtune.apply(build_model("llama").to(torch.bfloat16), "adapter")
    dtypes = {name: p.dtype for name, p in tuned.model.named_parameters() if p.requires_grad}
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if ".adapter." in name)
    assert_close(logits(tuned), logits(base), atol=0)


# --- what trains -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "m"), [({}, HIDDEN // 16), ({"reduction_factor": 8}, 4), ({"bottleneck": 5}, 5)])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapters_and_norms_train_with_the_chosen_bottleneck(arch, size, m):
    tuned = lmtune.apply(build_model(arch), {"name": "adapter", **size})
    adapter_names = {f"{site}.adapter.{part}" for site in sites(arch)
                     for part in ("down.weight", "down.bias", "up.weight", "up.bias")}
    assert trainable(tuned) == adapter_names | norms(arch)
    per_site = 2 * HIDDEN * m + m + HIDDEN  # W_down, W_up, b_down, b_up
    norm_count = sum(p.numel() for name, p in build_model(arch).named_parameters() if name in norms(arch))
    assert tuned.trainable_parameters()[0] == 2 * LAYERS * per_site + norm_count
    tuned = lmtune.apply(build_model(arch), {"name": "adapter", "placement": "pfeiffer", "train_norms": False,
                                             **size})
    assert tuned.trainable_parameters()[0] == LAYERS * per_site


def test_disabled_with_trained_norms_is_the_base_model_and_keeps_the_graph():
    tuned = lmtune_adapter("llama")
    with torch.no_grad():  # as if training had moved the norms
        for name, p in tuned.model.named_parameters():
            if name in norms("llama"):
                p.mul_(1.5)
    ids, mask, labels = batch()
    tuned(ids, mask, labels).loss.backward()
    expected = {name: p.grad.clone() for name, p in tuned.model.named_parameters() if p.requires_grad}
    tuned.model.zero_grad()
    adapted = logits(tuned)
    loss = tuned(ids, mask, labels).loss  # a policy forward, then a reference pass, then the backward (DPO)
    with tuned.disabled():
        assert_close(logits(tuned), logits(build_model("llama")), atol=0)
    loss.backward()
    for name, p in tuned.model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, expected[name], atol=0)
    assert_close(logits(tuned), adapted, atol=0)
    assert_differs(adapted, logits(build_model("llama")))


# --- checkpoints: our own format -------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpoint_format_and_round_trip(arch, tmp_path, tokenizer):
    base_dir = tmp_path / "base"
    build_model(arch).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    tuned = lmtune_adapter(arch, reduction_factor=8, nonlinearity="silu")
    with torch.no_grad():  # trained norms must travel with the adapters
        for name, p in tuned.model.named_parameters():
            if name in norms(arch):
                p.mul_(1.5)
    expected = logits(tuned)
    save(tuned, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    attention, ffn = (site.split("{i}.")[1] for site in SITES[arch])
    assert {k: config[k] for k in ("peft_type", "format_version", "placement", "bottleneck", "nonlinearity",
                                   "train_norms", "attention_output_modules", "ffn_modules")} == {
        "peft_type": "LMTUNE_ADAPTER", "format_version": 1, "placement": "houlsby", "bottleneck": 4,
        "nonlinearity": "silu", "train_norms": True, "attention_output_modules": [attention], "ffn_modules": [ffn]}
    state = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert set(state) == {f"base_model.model.{name}" for name in trainable(tuned)}
    assert state[f"base_model.model.{sites(arch)[0]}.adapter.down.weight"].shape == (4, HIDDEN)
    (tmp_path / "run" / "lmtune.json").unlink()  # adapter_config.json alone must be enough
    loaded, _ = lmtune.load(tmp_path / "run", base=str(base_dir))
    assert loaded.method_config.nonlinearity == "silu" and loaded.method_config.bottleneck == 4
    assert_close(logits(loaded), expected, atol=0)


def test_checkpoint_on_a_different_base_is_refused(tmp_path, tokenizer):
    save(lmtune_adapter("llama", bottleneck=4), tmp_path / "run")
    base_dir = tmp_path / "base"
    build_model("gpt2").save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    with pytest.raises(lmtune.LmtuneError, match="adapter does not fit this base model"):
        lmtune.load(tmp_path / "run", base=str(base_dir))


def test_merge_is_refused():
    with pytest.raises(lmtune.LmtuneError, match="cannot merge 'adapter': bottleneck adapters are non-linear"):
        lmtune_adapter("llama").merge()


# --- user errors -----------------------------------------------------------------------------------

def test_unknown_architecture_names_the_options_to_set():
    model = build_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(lmtune.LmtuneError, match="method.ffn_modules .* method.attention_output_modules"):
        lmtune.apply(model, "adapter")
    assert all(p.requires_grad for p in model.parameters())  # untouched
    tuned = lmtune.apply(model, {"name": "adapter", "ffn_modules": ["mlp"],
                                 "attention_output_modules": r".*\.self_attn\.o_proj"})
    assert sum(isinstance(m, AdapterSite) for m in tuned.model.modules()) == 2 * LAYERS


def test_sites_matching_nothing_list_the_block_modules():
    with pytest.raises(lmtune.LmtuneError, match="'ffn' matched no module.*mlp, mlp.act_fn"):
        lmtune.apply(build_model("llama"), {"name": "adapter", "ffn_modules": "ffn"})


@pytest.mark.parametrize("options", [{"bottleneck": 4, "reduction_factor": 8}, {"bottleneck": 0},
                                     {"nonlinearity": "swishy"}], ids=["both sizes", "zero", "nonlinearity"])
def test_bad_options_are_one_line_errors(options):
    with pytest.raises(lmtune.LmtuneError, match="config: 'method"):
        lmtune.apply(build_model("llama"), {"name": "adapter", **options})


# --- through the CLI (in process, as tests/test_cli.py does) ----------------------------------------
MERGE_REFUSAL = ("lmtune: error: cannot merge 'adapter': bottleneck adapters are non-linear (h + W_up f(W_down h)), "
                 "so they cannot be folded into the base weights; use the run directory itself (lmtune generate "
                 "RUN_DIR)")


@pytest.fixture
def cli(capfd, monkeypatch, tmp_path):
    yield from in_process_cli(capfd, monkeypatch, tmp_path)


def test_trains_from_yaml_generates_and_merge_is_refused(cli, tmp_path, model_dir):
    (tmp_path / "chat.jsonl").write_text(json.dumps(CHAT) + "\n")
    (tmp_path / "run.yaml").write_text(f"model: {model_dir}\nmethod: {{name: adapter, bottleneck: 4}}\n"
                                       "data: {train: chat.jsonl}\ntrain: {steps: 3, batch_size: 1, lr: 0.01}\n")
    code, _, err = cli("train", "run.yaml", "output_dir=run")
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    code, out, err = cli("generate", "run", "--prompt", "What is two plus two?", "--max-new-tokens", "4")
    assert (code, out) == (0, generate(*lmtune.load(tmp_path / "run"), "What is two plus two?", 4) + "\n"), err
    assert cli("merge", "run", "--out", "merged") == (2, "", MERGE_REFUSAL + "\n")
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())


def test_qwen3_sites_are_known():
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    tuned = lmtune.apply(AutoModelForCausalLM.from_config(config).eval(), {"name": "adapter", "init": "random"})
    assert {name for name, m in tuned.model.named_modules() if isinstance(m, AdapterSite)} == {
        f"model.layers.{i}.{site}" for i in range(LAYERS) for site in ("self_attn.o_proj", "mlp")}
