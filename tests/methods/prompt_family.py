"""Helpers shared by the prompt-family tests (prompt, p-tuning, prefix, p-tuning-v2): PEFT as the oracle."""

from __future__ import annotations

import torch
from conftest import build_model, build_tokenizer
from peft import PeftModel

import lmtune
from lmtune.checkpoint import save

ATOL = 1e-5
NVT = 3


def batch(pad: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 7 token slots; the second holds 5 real tokens, padded on the `pad` side."""
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if pad == "right":
        mask[1, 5:] = 0
    else:
        ids[1] = torch.cat([torch.zeros(2, dtype=torch.long), ids[1, :5]])
        mask[1, :2] = 0
    return ids, mask


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def real_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of the real (unmasked) tokens, flattened; PEFT's prompt tuning also returns the virtual ones."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    return out[:, -ids.shape[1]:][mask.bool()]


def tuned(arch: str, method: dict, seed: int = 0) -> lmtune.TunedModel:
    torch.manual_seed(seed + 100)
    return lmtune.apply(build_model(arch), {"num_virtual_tokens": NVT, **method}, base_name=f"tiny-{arch}")


def assert_peft_loads_ours(arch: str, method: dict, tmp_path) -> None:
    ours = tuned(arch, method)
    save(ours, tmp_path)
    peft = PeftModel.from_pretrained(build_model(arch), tmp_path)
    ids, mask = batch()
    expected = real_logits(peft, ids, mask)
    assert (expected - real_logits(build_model(arch), ids, mask)).abs().max() > 1e-3, "the prompt changed nothing"
    assert_close(real_logits(ours, ids, mask), expected)


def assert_we_load_peft(arch: str, peft_config, tmp_path) -> None:
    """PEFT trains nothing here: its random init is a non-trivial prompt; we load its file on the same base."""
    base_dir = tmp_path / "base"
    build_model(arch).save_pretrained(base_dir)
    build_tokenizer().save_pretrained(base_dir)
    torch.manual_seed(7)
    from peft import get_peft_model

    peft = get_peft_model(build_model(arch), peft_config)
    peft.save_pretrained(tmp_path / "adapter")
    ours, _ = lmtune.load(tmp_path / "adapter", base=str(base_dir))
    ids, mask = batch()
    assert_close(real_logits(ours, ids, mask), real_logits(peft, ids, mask))


def assert_left_padding_is_invisible(arch: str, method: dict) -> None:
    """A padded row's logits equal those of the same row alone, whichever side holds the padding."""
    model = tuned(arch, method)
    for pad in ("right", "left"):
        ids, mask = batch(pad)
        row = ids[1][mask[1].bool()].unsqueeze(0)
        alone = real_logits(model, row, torch.ones_like(row))
        assert_close(real_logits(model, ids, mask)[7:], alone)


def sft_batch() -> dict[str, torch.Tensor]:
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt without loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
