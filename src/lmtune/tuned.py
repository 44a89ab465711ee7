"""`TunedModel`: a transformers model with a method applied, and what a user does with it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import Cache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from lmtune.errors import LmtuneError
from lmtune.methods import Method, MethodConfig, get_method, parse_method_config
from lmtune.objectives import token_nll
from lmtune.saving import save


class TunedModel(nn.Module):
    """The base model with `method` applied; call it like a causal LM."""

    def __init__(self, model: PreTrainedModel, method: Method, config: MethodConfig,
                 base_name: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.method_config = config
        self.base_name = base_name
        """The model name the user gave (None: the packaged default), recorded in checkpoints."""

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The base model's layer classes: what accelerate's FSDP auto-wrap shards one by one."""
        return getattr(self.model, "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutput:
        """Logits for the real tokens; `.loss` is the mean next-token NLL over labels != -100."""
        inputs, prepended = self._prepare({"input_ids": input_ids, "attention_mask": attention_mask, **kwargs})
        if self.model.config.is_encoder_decoder and labels is not None:  # T5 / BART: labels are the decoder's
            out = self.model(**inputs, labels=labels, use_cache=False)
            return CausalLMOutput(loss=out.loss, logits=out.logits)
        logits = self.model(**inputs, use_cache=False).logits
        if prepended and logits.dim() == 3 and logits.shape[1] == inputs["attention_mask"].shape[1]:
            logits = logits[:, prepended:]  # the virtual tokens' own positions predict nothing
        loss = None
        if labels is not None:
            total, count = token_nll(logits, labels)
            loss = total / count.clamp(min=1)
        return CausalLMOutput(loss=loss, logits=logits)

    def last_hidden_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final layer's hidden states of the real tokens (batch x seq x hidden), without the LM head
        (a scalar head reads them: reward models)."""
        inputs, prepended = self._prepare({"input_ids": input_ids, "attention_mask": attention_mask})
        hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state
        return hidden[:, prepended:] if prepended and hidden.shape[1] > input_ids.shape[1] else hidden

    def _prepare(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """The method's input hook (prompt family), if it has one: inputs -> model kwargs, prepended count."""
        if self.method.prepare_inputs is None:
            return inputs, 0
        return self.method.prepare_inputs(self.model, inputs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """transformers' `generate` (prompt + new tokens), through the method's input hook."""
        if self.method.prepare_inputs is None:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        inputs, _ = self._prepare({"input_ids": input_ids, "attention_mask": attention_mask})
        self._expand_caches(inputs, kwargs)
        # generate derives the same positions from the extended mask, and extends them per new token.
        inputs.pop("position_ids", None)
        if "inputs_embeds" in inputs and not self.config.is_encoder_decoder:  # input_ids start the returned sequence
            inputs["input_ids"] = input_ids
        return self.model.generate(**inputs, **kwargs)

    def _expand_caches(self, inputs: dict[str, Any], kwargs: dict[str, Any]) -> None:
        """generate repeats each row for beams / several samples, but not a cache it was given (a prefix)."""
        config = self.model.generation_config
        beams = kwargs.get("num_beams") or config.num_beams or 1
        repeats = beams if beams > 1 else kwargs.get("num_return_sequences") or config.num_return_sequences or 1
        if repeats > 1:
            for value in inputs.values():
                if isinstance(value, Cache):
                    value.batch_repeat_interleave(repeats)

    @property
    def config(self) -> Any:
        return self.model.config

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, each shared tensor counted once."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total

    def describe_parameters(self) -> str:
        trainable, total = self.trainable_parameters()
        return (f"trainable params: {trainable:,} || all params: {total:,} || "
                f"trainable%: {100 * trainable / total:.4f}")

    def print_trainable_parameters(self) -> None:
        print(self.describe_parameters())

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run as the base model: every method module is switched off inside the block."""
        switches = [m for m in self.model.modules() if hasattr(m, "disabled")]
        if not switches:
            raise LmtuneError(f"'{self.method.name}' changes the base weights; there is nothing to switch off")
        for m in switches:
            m.disabled = True
        try:
            yield
        finally:
            for m in switches:
                m.disabled = False

    def merge(self) -> PreTrainedModel:
        """Fold the method into the base weights (in place) and return the plain transformers model."""
        if self.method.merge is None:
            raise LmtuneError(f"cannot merge '{self.method.name}': {self.method.merge_refusal}")
        return self.method.merge(self.model)

    def save(self, directory: str) -> None:
        save(self, directory)


def apply(model: PreTrainedModel, method: MethodConfig | str | dict = "lora",
          base_name: str | None = None, tokenizer: Any = None) -> TunedModel:
    """Apply a method (name, mapping of options, or config object) to `model` in place.

    `tokenizer`: the model's tokenizer, for methods that use one (prompt tuning's init from text).
    """
    config = parse_method_config(method)
    spec = get_method(config.name)
    if spec.takes_tokenizer and tokenizer is not None:
        spec.apply(model, config, tokenizer=tokenizer)
    else:
        spec.apply(model, config)
    return TunedModel(model, spec, config, base_name)


def enable_gradient_checkpointing(tuned: TunedModel) -> None:
    """Recompute each decoder layer's activations during backward instead of keeping them.

    Non-reentrant checkpointing: it needs no input that requires grad, so a frozen embedding layer
    (LoRA, IA3, ...) works without PEFT's `enable_input_require_grads` trick.
    """
    model = tuned.model
    if tuned.method.gradient_checkpointing_refusal:
        raise LmtuneError(f"{tuned.method.name}: {tuned.method.gradient_checkpointing_refusal}")
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LmtuneError(f"{type(model).__name__} does not support gradient checkpointing; "
                          f"set train.gradient_checkpointing=false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
