"""The training loss with the LM head applied only where it is scored.

`model(**batch).loss` runs the LM head at every position of every row, (rows, length, vocab)
logits (152,064 wide for Qwen2-VL-7B), to score the few answer tokens whose labels are not -100.
`labelled_loss` gives the same loss with the head applied to those positions only: the logits at
position t predict token t + 1, so the rows kept are those whose NEXT label is set.

It goes through the model's own forward (a plain Qwen2-VL, a peft wrapper of it, accelerate's DDP
wrapper around either), not around it: the wrappers' forward is where DDP prepares its gradient
reduction and peft its adapters. Only the head's input changes, through a forward pre-hook that
lives for one call; the hidden states before the head are the model's own, so packed rows (their
position_ids and 4-D attention mask) are untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def output_head(model) -> torch.nn.Module:
    """The LM head under any wrappers: DDP / FSDP / compiled (accelerate's unwrap), then peft
    (whose attribute lookup falls through to the base model)."""
    from accelerate.utils import extract_model_from_parallel

    head = extract_model_from_parallel(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    return head


def next_token_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): the (rows, length) mask of positions whose next token is labelled, and
    those labels in row-major order. The shift of transformers' ForCausalLMLoss: labels padded
    with one ignored column and moved left by one, so a row's last position is never scored and
    no position is scored against the next row."""
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    keep = shifted != ignore_index
    return keep, shifted[keep]


def labelled_loss(model, batch: dict, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The loss `model(**batch).loss` takes (transformers' ForCausalLMLoss: float32 cross-entropy
    over the shifted labels other than `ignore_index`; their mean, or their sum over
    `num_items_in_batch` when given), with the LM head applied to the scored positions only.

    `batch`: the model's keyword inputs with `labels`; `num_items_in_batch` may also be a key."""
    inputs = dict(batch)
    labels = inputs.pop("labels")
    num_items_in_batch = inputs.pop("num_items_in_batch", num_items_in_batch)
    keep, targets = next_token_targets(labels, ignore_index)

    def gather(module, args):
        (hidden,) = args
        if hidden.shape[:2] != keep.shape:
            raise ValueError(f"labelled_loss: the LM head got hidden states {tuple(hidden.shape)}, "
                             f"the labels are {tuple(keep.shape)}")
        return (hidden[keep.to(hidden.device)],)     # (scored tokens, hidden)

    handle = output_head(model).register_forward_pre_hook(gather)
    try:
        logits = model(**inputs).logits                # (scored tokens, vocab)
    finally:
        handle.remove()
    targets = targets.to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
    total = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
