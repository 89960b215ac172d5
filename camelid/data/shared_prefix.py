"""One prompt and several continuations in a single row: each continuation follows the prompt at the
positions it would have alone and sees the prompt and itself, not its siblings. The prompt is then read once
for all of them: lm-eval's choices of a question (`camelid eval`), a preference pair's chosen and rejected
replies (preference tuning)."""

from __future__ import annotations

import torch


def shared_row(ctx, conts: list[list[int]], read_last: bool = False):
    """Tokens, positions, segment of each token (0 context, i for continuation i) and, for every
    continuation, the row index whose logits predict each of its tokens. A continuation's last token is
    only predicted, never read, unless `read_last`: a reward model scores the whole text at its last token,
    whose index predict_from[i] then ends with (after the len(cont) that predict)."""
    tokens, positions, segments = list(ctx), list(range(len(ctx))), [0] * len(ctx)
    predict_from = []
    for i, cont in enumerate(conts, 1):
        start = len(tokens)
        body = cont if read_last else cont[:-1]
        tokens += body
        positions += range(len(ctx), len(ctx) + len(body))
        segments += [i] * len(body)
        predict_from.append([len(ctx) - 1] + list(range(start, start + len(body))))
    return tokens, positions, segments, predict_from


def batch_layout(rows: list[tuple], device) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded tokens and the (positions, mask) layout for a batch of shared rows."""
    width = max(len(r[0]) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding, which sees only padding
    for b, (tok, pos, seg, _) in enumerate(rows):
        tokens[b, :len(tok)] = torch.tensor(tok)
        positions[b, :len(pos)] = torch.tensor(pos)
        segments[b, :len(seg)] = torch.tensor(seg)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segments[:, :, None] == segments[:, None, :]
    sees_context = (segments[:, None, :] == 0) & (segments[:, :, None] >= 0)
    mask = (same | sees_context) & causal
    return tokens.to(device), (positions.to(device), mask.unsqueeze(1).to(device))
