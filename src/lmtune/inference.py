"""Try a model: one reply to a prompt, or a chat loop. Greedy unless a temperature is given."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from lmtune.errors import LmtuneError
from lmtune.tuned import TunedModel


def reply(tuned: TunedModel, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]] | str,
          max_new_tokens: int = 128, temperature: float = 0.0) -> str:
    """The model's answer to a conversation (chat template) or to raw text (a plain string)."""
    _check_settings(max_new_tokens, temperature)
    if isinstance(messages, str):
        inputs = tokenizer(messages, return_tensors="pt")
    else:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
    device = next(tuned.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 \
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    tuned.eval()
    with torch.no_grad():
        out = tuned.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             use_cache=True, **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _check_settings(max_new_tokens: int, temperature: float) -> None:
    """User mistakes as LmtuneError: transformers would raise deep inside generate, or sample silently greedy."""
    if max_new_tokens < 1:
        raise LmtuneError(f"max new tokens must be at least 1 (got {max_new_tokens})")
    if not 0 <= temperature < float("inf"):  # NaN too
        raise LmtuneError(f"temperature must be >= 0 and finite, 0 meaning greedy (got {temperature})")


def generate(tuned: TunedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 128,
             temperature: float = 0.0, raw: bool = False) -> str:
    """One reply; the prompt goes through the chat template unless `raw` or the tokenizer has none."""
    if raw or not tokenizer.chat_template:
        return reply(tuned, tokenizer, prompt, max_new_tokens, temperature)
    return reply(tuned, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens, temperature)


def chat(tuned: TunedModel, tokenizer: PreTrainedTokenizerBase, read: Callable[[str], str] = input,
         write: Callable[[str], None] = print, max_new_tokens: int = 256, temperature: float = 0.0) -> None:
    """A multi-turn conversation until EOF, 'exit' or 'quit'; '/reset' clears the history."""
    _check_settings(max_new_tokens, temperature)  # before the user types, not after
    history: list[dict[str, str]] = []
    write("chat with the model; /reset clears the history, exit or Ctrl-D leaves")
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            write("")
            return
        if text in ("exit", "quit"):
            return
        if text == "/reset":
            history = []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        answer = reply(tuned, tokenizer, history, max_new_tokens, temperature)
        history.append({"role": "assistant", "content": answer})
        write(f"model> {answer}")
