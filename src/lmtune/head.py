"""Log-probabilities of target tokens through the LM head, a chunk of rows at a time.

The (labelled tokens x vocabulary) fp32 logits, their log-softmax and the gradient of each are, with a 49k
vocabulary, the largest tensors of a small model's training step. Here they exist one chunk at a time:
the forward keeps per token only its log-sum-exp and, for a frozen head, the expected output embedding
E_p[W] (a hidden-size vector: the head's input gradient is g * (W[target] - E_p[W])), so the backward needs no
logits at all. A head that trains (full fine-tuning) recomputes each chunk's logits in the backward instead.
The matmuls are the same as a plain head's (forward and input gradient), the memory traffic is not.

The model runs with its output embedding switched to the identity (its `.logits` are then the final hidden
states of the kept positions); whether that is exact for a model (no logit scaling or soft-capping after the
head) is checked once on the model itself, and the plain path is used where it is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

CHUNK_ELEMENTS = 2**23
"""Logits per chunk (32 MB in fp32): rows = CHUNK_ELEMENTS // vocabulary size."""


class _HeadLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, want_grad: bool):  # noqa: ANN001, ANN205 (autograd API)
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        n = hidden.shape[0]
        logps = torch.empty(n, device=hidden.device, dtype=torch.float32)
        lse = torch.empty(n, device=hidden.device, dtype=torch.float32)
        frozen_head = not (weight.requires_grad or (bias is not None and bias.requires_grad))
        expected = torch.empty_like(hidden) if want_grad and frozen_head else None
        for start in range(0, n, rows):
            part = slice(start, start + rows)
            logits = F.linear(hidden[part], weight, bias).float()
            lse[part] = torch.logsumexp(logits, dim=-1)
            logps[part] = logits.gather(1, targets[part, None]).squeeze(1) - lse[part]
            if expected is not None:
                probs = logits.sub_(lse[part, None]).exp_()
                expected[part] = probs.to(weight.dtype) @ weight
        ctx.recompute = not frozen_head
        ctx.save_for_backward(hidden, weight, bias, targets, lse, expected)
        return logps

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        hidden, weight, bias, targets, lse, expected = ctx.saved_tensors
        if not ctx.recompute:  # d logp / d hidden = W[target] - E_p[W]
            grad_hidden = (weight[targets] - expected) * grad[:, None].to(expected.dtype)
            return grad_hidden, None, None, None, None
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            logits = F.linear(hidden[part], weight, bias).float()
            # d logp / d logits = onehot(target) - softmax
            dlogits = logits.sub_(lse[part, None]).exp_().mul_(-grad[part, None])
            dlogits[torch.arange(dlogits.shape[0], device=dlogits.device), targets[part]] += grad[part]
            if grad_hidden is not None:
                grad_hidden[part] = dlogits.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight += dlogits.T @ hidden[part].float()
            if grad_bias is not None:
                grad_bias += dlogits.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def head_logps(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) under `head(hidden[i])`, for (tokens x hidden) `hidden`, in fp32."""
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _HeadLogps.apply(hidden, head.weight, head.bias, targets, want_grad)


def _causal_lm(model: nn.Module) -> PreTrainedModel | None:
    """The transformers model inside a TunedModel / DDP wrapper (the outermost PreTrainedModel)."""
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


@contextmanager
def _identity_head(head: nn.Module) -> Iterator[None]:
    head.forward = lambda x: x  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del head.forward


@contextmanager
def hidden_states_for_head(model: nn.Module, check: bool = True) -> Iterator[nn.Linear | None]:
    """Inside: the model's `.logits` are its final hidden states, and the head is yielded; or, where that would
    not be exact (a head that is not a plain Linear, or logits changed after it), nothing changes and None.

    `check=False` skips running the model to check the latter (the memory trace, on fake tensors, cannot).
    """
    causal = _causal_lm(model)
    head = causal.get_output_embeddings() if causal is not None else None
    if type(head) is not nn.Linear or (check and not _head_is_last(causal, head)):
        yield None
        return
    with _identity_head(head):
        yield head


@torch.no_grad()
def _head_is_last(causal: PreTrainedModel, head: nn.Linear) -> bool:
    """True when the model's logits are exactly head(final hidden state) (checked once per model, in eval mode)."""
    known = getattr(head, "_lmtune_head_is_last", None)
    if known is not None:
        return known
    was_training = causal.training
    causal.eval()
    try:
        ids = torch.arange(3, 7, device=head.weight.device)[None] % causal.config.vocab_size
        logits = causal(input_ids=ids, use_cache=False).logits
        with _identity_head(head):
            hidden = causal(input_ids=ids, use_cache=False).logits
        ok = hidden.shape[-1] == head.in_features and torch.allclose(head(hidden), logits, atol=1e-4, rtol=1e-4)
    except Exception:  # noqa: BLE001  a model this check cannot run on keeps the plain path
        ok = False
    finally:
        causal.train(was_training)
    head._lmtune_head_is_last = ok
    return ok
