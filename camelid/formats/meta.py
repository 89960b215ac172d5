"""Meta's original LLaMA 1 and LLaMA 2 checkpoints: a folder with `params.json` and `consolidated.NN.pth`, one
file per model-parallel rank, and `tokenizer.model` beside it or in the folder above (the layout Meta's
download script leaves).

Each file is read with `weights_only=True` and memory-mapped; a tensor is merged from the ranks' slices when it
is taken (attention and MLP input projections and the output layer are split by rows, the attention output,
the MLP's down projection and the embedding by columns, norms are whole in every file). The result has
Hugging Face's names, with wq and wk permuted from Meta's rotary layout (interleaved pairs) to the halves
transformers' LLaMA rotates, as transformers' convert_llama_weights_to_hf.py does, so the Hugging Face
loader takes it from there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from camelid.errors import CamelidError
from camelid.files import read_json
from camelid.formats.tensors import load_pickle_weights
from camelid.model.config import ModelConfig
from camelid.tokenizer.tokenizer import load_sentencepiece

# Meta's name (after "layers.N.") -> (Hugging Face's, the dimension its ranks split; None: every rank has it whole)
_LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0), "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0), "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0), "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1), "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_TOP = {"tok_embeddings.weight": ("model.embed_tokens.weight", 1), "norm.weight": ("model.norm.weight", None),
        "output.weight": ("lm_head.weight", 0)}


def is_meta_folder(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").exists() and any(path.glob("consolidated.*.pth"))


def find_tokenizer(folder: Path) -> Path:
    for place in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if place.exists():
            return place
    raise CamelidError(f"{folder}: no tokenizer.model in it or in {folder.parent} (Meta's download puts it beside "
                       "the model folders; give --tokenizer)")


def open_params(folder: Path, tokenizer_path: str | Path | None = None):
    """(the ModelConfig, the SentencePiece tokenizer) of a Meta folder: the tokenizer says the vocabulary."""
    sp = load_sentencepiece(Path(tokenizer_path) if tokenizer_path else find_tokenizer(folder))
    return config_from_params(folder, sp.get_piece_size()), sp


def config_from_params(folder: Path, vocab_size: int | None = None) -> ModelConfig:
    """params.json as a ModelConfig. vocab_size -1 (LLaMA 1 and 2) is the tokenizer's; the context, which the
    file does not hold, is LLaMA 2's 4,096 where its norm epsilon (1e-5) says LLaMA 2, else LLaMA 1's 2,048."""
    path = folder / "params.json"
    params = read_json(path)
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(params.get(key), int) or params[key] < 1:
            raise CamelidError(f"{path}: {key} must be a positive integer")
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    if dim % n_heads or n_heads % n_kv_heads:
        raise CamelidError(f"{path}: dim {dim}, n_heads {n_heads} and n_kv_heads {n_kv_heads} do not divide")
    vocab = params.get("vocab_size", -1)
    if not isinstance(vocab, int) or vocab <= 0:
        vocab = vocab_size
    if not vocab:
        raise CamelidError(f"{path}: vocab_size is {params.get('vocab_size', -1)} and no tokenizer says it")
    multiple_of = params.get("multiple_of", 256)
    hidden = int(2 * (4 * dim) / 3)  # Meta's FeedForward: 2/3 of 4 dim, scaled, rounded up to multiple_of
    if params.get("ffn_dim_multiplier"):
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    eps = float(params.get("norm_eps", 1e-6))
    return ModelConfig(arch="llama", vocab_size=vocab, dim=dim, n_layers=params["n_layers"], n_heads=n_heads,
                       n_kv_heads=n_kv_heads, ffn_dim=hidden, norm_eps=eps,
                       max_seq_len=params.get("max_seq_len") or (4096 if eps == 1e-5 else 2048),
                       rope_theta=float(params.get("rope_theta", 10000.0)))


class MetaTensors(Mapping):
    """The checkpoint's tensors under Hugging Face's names, each merged from the ranks' files when it is taken."""

    def __init__(self, folder: Path, cfg: ModelConfig):
        self.files = sorted(folder.glob("consolidated.*.pth"))
        self.ranks = [load_pickle_weights(f) for f in self.files]
        self.cfg = cfg
        self.names: dict[str, tuple[str, int | None]] = {}
        for meta, (name, split) in _TOP.items():
            self.names[name] = (meta, split)
        for i in range(cfg.n_layers):
            for meta, (name, split) in _LAYER.items():
                self.names[f"model.layers.{i}.{name}"] = (f"layers.{i}.{meta}", split)
        for meta, _ in self.names.values():
            for f, rank in zip(self.files, self.ranks):
                if meta not in rank:
                    raise CamelidError(f"{f}: tensor {meta} is missing (a LLaMA checkpoint has it in every file)")

    def __getitem__(self, name: str) -> torch.Tensor:
        meta, split = self.names[name]
        parts = [rank[meta] for rank in self.ranks]
        t = parts[0] if split is None or len(parts) == 1 else torch.cat(parts, dim=split)
        cfg = self.cfg
        if meta.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = cfg.n_heads if meta.endswith("wq.weight") else cfg.n_kv_heads
            expected = (heads * cfg.head_dim, cfg.dim)
            if tuple(t.shape) != expected:
                raise CamelidError(f"{self.files[0].parent}: {meta} merged from {len(parts)} files has shape "
                                   f"{tuple(t.shape)}, params.json says {expected}")
            t = to_halves(t, heads)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from Meta's rotary pairs (0, 1), (2, 3)... to transformers' halves (0, d/2), (1, d/2 + 1)."""
    out, cols = w.shape
    return w.view(heads, out // heads // 2, 2, cols).transpose(1, 2).reshape(out, cols)
