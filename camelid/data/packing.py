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


def seq2seq_rows(samples: list[Sample], eos_id: int | None) -> list[Row]:
    """An encoder-decoder's rows, as FastChat trained FastChat-T5: for each reply a sample trains, the encoder
    reads everything before it (ending in EOS, as T5's tokenizer ends a text) and the decoder writes the reply.
    `inputs` holds the source, `targets` the reply."""
    rows = []
    for s in samples:
        i = 0
        while i < len(s.ids):
            if s.labels[i] == IGNORE:
                i += 1
                continue
            j = i
            while j < len(s.ids) and s.labels[j] != IGNORE:
                j += 1
            source = s.ids[:i] + ([eos_id] if eos_id is not None and s.ids[i - 1:i] != [eos_id] else [])
            rows.append(Row(source, s.ids[i:j], []))
            i = j
    return rows


def collate_seq2seq(rows: list[Row], start_id: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded sources with their mask, and the decoder's inputs (its start token, then the reply but its
    last token) with the reply as targets (IGNORE on padding)."""
    S, T = max(len(r.inputs) for r in rows), max(len(r.targets) for r in rows)
    inputs = torch.full((len(rows), S), pad_id, dtype=torch.long)
    decoder_inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        inputs[i, :len(r.inputs)] = torch.tensor(r.inputs)
        decoder_inputs[i, :len(r.targets)] = torch.tensor([start_id] + r.targets[:-1])
        targets[i, :len(r.targets)] = torch.tensor(r.targets)
    mask = torch.arange(S)[None, :] < torch.tensor([len(r.inputs) for r in rows])[:, None]
    return {"inputs": inputs, "source_mask": mask, "decoder_inputs": decoder_inputs, "targets": targets}
