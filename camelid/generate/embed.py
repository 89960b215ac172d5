"""Text embeddings from a language model's final hidden states, pooled per text: the mean of its tokens,
its last token, or its first ("cls"); L2-normalised unless asked not to be. Texts are embedded in batches,
left-padded, each row computing what it would alone."""

from __future__ import annotations

import torch

from camelid.errors import CamelidError

POOLINGS = ("mean", "last", "cls")


@torch.inference_mode()
def embed(model, inputs: list[list[int]], pooling: str = "mean", normalize: bool = True,
          batch_size: int = 16) -> torch.Tensor:
    """(len(inputs), dim) fp32 embeddings of token-id lists."""
    if pooling not in POOLINGS:
        raise CamelidError(f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    for i, ids in enumerate(inputs):
        if not ids:
            raise CamelidError(f"input {i}: the text has no tokens")
        if len(ids) > model.cfg.max_seq_len:
            raise CamelidError(f"input {i}: {len(ids)} tokens, more than the model's context of "
                               f"{model.cfg.max_seq_len}")
    out = []
    for first in range(0, len(inputs), batch_size):
        out.append(_batch(model, inputs[first:first + batch_size], pooling))
    vectors = torch.cat(out)
    return torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors


def _batch(model, batch: list[list[int]], pooling: str) -> torch.Tensor:
    longest = max(map(len, batch))
    tokens = torch.zeros(len(batch), longest, dtype=torch.long, device=model.device)
    real = torch.zeros(len(batch), longest, dtype=torch.bool, device=model.device)
    for i, ids in enumerate(batch):
        tokens[i, longest - len(ids):] = torch.tensor(ids, device=model.device)
        real[i, longest - len(ids):] = True
    states = model(tokens, 0, None, real if not real.all() else None, hidden=True)
    if pooling == "last":
        return states[:, -1]
    if pooling == "cls":
        return states[torch.arange(len(batch)), real.int().argmax(dim=1)]
    weights = real.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1)
