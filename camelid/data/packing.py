"""Batches for instruction tuning: each sample's inputs and shifted targets, padded one per row or packed
several to a row with segment ids (the model then keeps samples from attending to each other and restarts
positions, so a packed sample trains exactly as it would alone)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from camelid.data.masking import IGNORE, Sample


@dataclass
class Row:
    inputs: list[int]
    targets: list[int]  # the next token's label; IGNORE where masked and at each sample's end
    segments: list[int]


def shifted(sample: Sample) -> tuple[list[int], list[int]]:
    return sample.ids, sample.labels[1:] + [IGNORE]


def pack_samples(samples: list[Sample], seq_len: int) -> list[Row]:
    """Greedy packing in order (the data order stays reproducible): a row is closed when the next sample
    does not fit. A sample longer than seq_len must have been split or truncated before."""
    rows, row = [], Row([], [], [])
    for sample in samples:
        inputs, targets = shifted(sample)
        if len(inputs) > seq_len:
            raise ValueError(f"a sample of {len(inputs)} tokens is longer than seq_len {seq_len}")
        if row.inputs and len(row.inputs) + len(inputs) > seq_len:
            rows.append(row)
            row = Row([], [], [])
        segment = row.segments[-1] + 1 if row.segments else 0
        row.inputs += inputs
        row.targets += targets
        row.segments += [segment] * len(inputs)
    if row.inputs:
        rows.append(row)
    return rows


def unpacked_rows(samples: list[Sample]) -> list[Row]:
    return [Row(*shifted(s), [0] * len(s.ids)) for s in samples]


def collate(rows: list[Row], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding has its own segment id and IGNORE targets."""
    T = max(len(r.inputs) for r in rows)
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    segments = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.inputs)
        inputs[i, :n] = torch.tensor(r.inputs)
        targets[i, :n] = torch.tensor(r.targets)
        segments[i, :n] = torch.tensor(r.segments)
    return {"inputs": inputs, "targets": targets, "segments": segments}
