"""A model as camelid opened it: the network, its tokenizer, and how to prompt it (template, stop strings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from camelid.errors import CamelidError
from camelid.model.config import ModelConfig
from camelid.model.transformer import Transformer
from camelid.tokenizer.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    template: str = "raw"  # a built-in template name or Jinja source
    stop: list[str] = field(default_factory=list)  # stop strings besides the tokenizer's EOS ids
    source: str = ""
    quantization: dict | None = None  # how the weights were quantized (camelid quantize), if they were
    template_note: str = ""  # how the template was chosen, where the model brought none
    load_note: str = ""  # what reading the file changed, where anything did (an old file's blocks)

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg


def require_policy(lm: LoadedModel, path) -> LoadedModel:
    """A reward model scores text and does not write it: refuse one where a model must generate or be tuned."""
    if lm.config.score_head:
        raise CamelidError(f"{path}: a reward model (it scores text, it does not write it); it is the "
                           "reward_model of `camelid rlhf`, not a model to chat with or tune")
    return lm


def require_decoder_only(lm: LoadedModel, path, what: str) -> LoadedModel:
    """The paths built on a decoder's one stream of tokens (perplexity, RLHF, GPTQ's calibration) refuse an
    encoder-decoder (T5) by name."""
    require_plain_positions(lm, path, what)
    if lm.config.n_encoder_layers:
        raise CamelidError(f"{path}: an encoder-decoder model (T5) runs in `generate`, `chat`, `serve`, `quantize`, "
                           f"`convert`, `export`, `eval`'s choice tasks and fine-tuning; {what} takes decoder-only "
                           "models")
    return lm


def require_plain_positions(lm_or_config, path, what: str):
    """ChatGLM-6B's blank-infilling positions (a context that attends both ways, positions kept from its prompt)
    take the whole prompt in one pass and one cache per sequence: the paths that cut, pack, page or share
    prompts refuse it by name."""
    cfg = getattr(lm_or_config, "config", lm_or_config)
    if cfg.positions == "glm_2d":
        raise CamelidError(f"{path}: ChatGLM-6B (GLM's blank-infilling positions) runs in `generate` and `chat` "
                           f"(without speculation or --kv-type), `convert` and `quantize` (round to nearest); "
                           f"{what} does not take it")
    return lm_or_config
