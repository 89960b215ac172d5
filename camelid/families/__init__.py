"""Everything camelid knows about each model family, one module per family (see spec.py for the shape).

Adding a family is one module here and one entry in FAMILIES; docs/adding-a-family.md walks through it."""

from __future__ import annotations

from camelid.errors import CamelidError
from camelid.families import bloom, falcon, gemma, glm, gpt2, gpt_neox, gptj, llama, mpt, opt, phi3, qwen, starcoder, t5
from camelid.families.spec import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, gpt2.FAMILY, gptj.FAMILY, gpt_neox.FAMILY,
                                                    falcon.FAMILY, opt.FAMILY, qwen.QWEN2, qwen.QWEN3, qwen.QWEN2_MOE,
                                                    qwen.QWEN3_MOE, gemma.GEMMA,
                                                    gemma.GEMMA2, gemma.GEMMA3, phi3.FAMILY,
                                                    starcoder.FAMILY, bloom.FAMILY, mpt.FAMILY, glm.GLM, glm.GLM4,
                                                    glm.CHATGLM, glm.CHATGLM6B, t5.FAMILY)}
HF_MODEL_TYPES: dict[str, Family] = {t: f for f in FAMILIES.values() for t in f.hf_model_types}
GGUF_ARCHS: dict[str, Family] = {f.gguf.arch: f for f in FAMILIES.values() if f.gguf}


def family(arch: str) -> Family:
    """The family of a ModelConfig's `arch`."""
    if arch not in FAMILIES:
        raise CamelidError(f"architecture {arch!r} is not one camelid knows ({', '.join(FAMILIES)})")
    return FAMILIES[arch]
