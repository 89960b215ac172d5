"""llama.cpp's BPE pre-tokenizers, as data (from llama-vocab.cpp's `llm_tokenizer_bpe` and the names its loader
maps onto them): each splits the text by its regexes in turn, keeping what falls between two matches as a piece
of its own, before the pieces are mapped to bytes as GPT-2 does and merged."""

# pre-tokenizer type -> its regexes, in the order llama.cpp applies them
REGEXES: dict[str, tuple[str, ...]] = {
    "bailingmoe": (
        "'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s"
        '\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+',
    ),
    "chameleon": (
        '<sentinel:[0-9]+>',
        '(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z',
        '([\\t\\n]|    |  )',
        '\\p{N}',
        '[\\p{P}!-/:-@\\[-`{-~]',
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ),
    "deepseek3_llm": (
        '\\p{N}{1,3}',
        '[一-龥\u3040-ゟ゠-ヿ]+',
        '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}'
        ']+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+',
    ),
    "deepseek_coder": (
        '[\r\n]',
        '\\s?\\p{L}+',
        '\\s?\\p{P}+',
        '[一-龥ࠀ-一가-\ud7ff]+',
        '\\p{N}',
    ),
    "deepseek_llm": (
        '[\r\n]',
        '\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ'
        '-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ'
        '-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+',
        '\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+',
        '\\s+$',
        '[一-龥ࠀ-一가-\ud7ff]+',
        '\\p{N}+',
    ),
    "default": (
        '[\\p{P}\\$\\+<=>\\^~\\|]+',
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        '\\p{N}+',
        '[0-9][0-9][0-9]',
    ),
    "exaone_moe": (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?(?:\\"
        'p{L}\\p{M}*(?: \\p{L}\\p{M}*)*)+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]?|\\s*[\\r\\n]|\\s+(?!\\'
        'S)|\\s+',
    ),
    "falcon": (
        '[\\p{P}\\$\\+<=>\\^~\\|`]+',
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        '[0-9][0-9][0-9]',
    ),
    "gpt2": (
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ),
    "gpt4o": (
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[r"
        "R][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))"
        "+((?=[\\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
        '?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+',
    ),
    "granite_emb_multi": (
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\p{M}])([^a-z]))*((?=[\\p{L}\\p{M}])([^A-Z]))+(?:'[sS]"
        "|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\"
        "p{M}])([^a-z]))+((?=[\\p{L}\\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'["
        "mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)"
        '|\\s+',
    ),
    "jais2": (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L"
        '}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s{512}(?!\\S)|\\s{256}(?!\\S)|\\'
        's{128}(?!\\S)|\\s{64}(?!\\S)|\\s{32}(?!\\S)|\\s{16}(?!\\S)|\\s{8}(?!\\S)|\\s{4}(?!\\S)|\\s{1'
        ',2}(?!\\S)|\\s{1}',
    ),
    "laguna": (
        '[^\\n]+|[\\n]+',
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L"
        '}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+',
    ),
    "llama3": (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L"
        '}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+',
    ),
    "minicpm5": (
        '\\p{N}{1,3}',
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L"
        '}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+',
    ),
    "poro": (
        ' ?[^(\\s|.,!?…。，、।۔،)]+',
    ),
    "qwen2": (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L"
        '}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+',
    ),
    "qwen35": (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?[\\p{"
        'L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+',
    ),
    "seed_coder": (
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L"
        '}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+',
    ),
    "spark2_5": (
        '\\p{N}{1,3}',
        '[一-龥\u3040-ゟ゠-ヿ]+',
        '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}'
        ']+| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+',
        '\\p{N}',
    ),
    "starcoder": (
        '\\p{N}',
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ),
    "superbpe": (
        '\\p{N}+',
        '(?=(\\d{3})+(?!\\d))',
    ),
    "tekken": (
        '[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p{N}]'
        '?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\'
        's*[\\r\\n]+|\\s+(?!\\S)|\\s+',
    ),
    "tiny_aya": (
        '\\d{1,3}(?=(?:\\d{3})*\\b)',
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?:'"
        "[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}"
        "\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV"
        "][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\"
        's+(?!\\S)|\\s+',
    ),
    "ufakzeka": (
        '[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s'
        '+',
    ),
    "viking": (
        ' ?[^(\\s|.,!?…。，、।۔،)]+',
        '\\p{N}',
    ),
    "youtu": (
        '[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥\u3040-ゟ゠-ヿ]+',
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?:'"
        "[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}"
        "\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV"
        "][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!"
        '\\S)|\\s+',
    ),
}

# tokenizer.ggml.pre -> (type, ignore_merges: a word the vocabulary holds whole is one token, unmerged)
NAMES: dict[str, tuple[str, bool]] = {
    'a.x-4.0': ("gpt2", False),
    'bailingmoe': ("bailingmoe", False),
    'bailingmoe2': ("bailingmoe", False),
    'bloom': ("poro", False),
    'chameleon': ("chameleon", False),
    'chatglm-bpe': ("llama3", False),
    'codeshell': ("starcoder", False),
    'cohere2moe': ("tiny_aya", False),
    'command-r': ("starcoder", False),
    'dbrx': ("llama3", False),
    'deepseek-coder': ("deepseek_coder", False),
    'deepseek-llm': ("deepseek_llm", False),
    'deepseek-r1-qwen': ("qwen2", False),
    'deepseek-v3': ("deepseek3_llm", False),
    'default': ("default", False),
    'exaone': ("starcoder", False),
    'exaone-moe': ("exaone_moe", False),
    'exaone4': ("gpt2", False),
    'f2llmv2': ("qwen2", False),
    'falcon': ("falcon", False),
    'falcon-h1': ("llama3", True),
    'falcon3': ("llama3", True),
    'gigachat': ("gpt2", False),
    'glm4': ("llama3", True),
    'glm5': ("llama3", True),
    'gpt-2': ("gpt2", False),
    'gpt-4o': ("gpt4o", False),
    'gpt3-finnish': ("poro", False),
    'granite-docling': ("gpt2", False),
    'granite-embed-multi-97m': ("granite_emb_multi", True),
    'grok-2': ("qwen2", False),
    'hunyuan': ("qwen2", False),
    'hunyuan-dense': ("deepseek3_llm", False),
    'hy_v4': ("deepseek3_llm", False),
    'jais': ("gpt2", False),
    'jais-2': ("jais2", False),
    'jina-de': ("gpt2", False),
    'jina-es': ("gpt2", False),
    'jina-v1-en': ("gpt2", False),
    'jina-v2-code': ("gpt2", False),
    'jina-v2-de': ("gpt2", False),
    'jina-v2-es': ("gpt2", False),
    'jina-v5-nano': ("llama3", True),
    'joyai-llm': ("deepseek3_llm", False),
    'kanana2': ("gpt4o", False),
    'kormo': ("qwen2", False),
    'laguna': ("laguna", False),
    'lfm2': ("llama3", True),
    'llada-moe': ("bailingmoe", False),
    'llama-bpe': ("llama3", True),
    'llama-v3': ("llama3", True),
    'llama3': ("llama3", True),
    'llama4': ("gpt4o", False),
    'megrez': ("qwen2", False),
    'mellum': ("gpt2", False),
    'mellum2': ("starcoder", False),
    'midm-2.0': ("llama3", True),
    'minerva-7b': ("starcoder", False),
    'minicpm5': ("minicpm5", True),
    'minimax-m2': ("gpt4o", False),
    'modern-bert': ("gpt2", False),
    'mpt': ("gpt2", False),
    'olmo': ("gpt2", False),
    'phi-2': ("gpt2", False),
    'pixtral': ("llama3", True),
    'poro-chat': ("poro", False),
    'qwen2': ("qwen2", False),
    'qwen35': ("qwen35", False),
    'refact': ("starcoder", False),
    'roberta-bpe': ("gpt2", False),
    'seed-coder': ("seed_coder", False),
    'smaug-bpe': ("llama3", False),
    'smollm': ("starcoder", False),
    'solar-open': ("qwen2", False),
    'spark2_5': ("spark2_5", False),
    'stablelm2': ("qwen2", False),
    'starcoder': ("starcoder", False),
    'superbpe': ("superbpe", False),
    'talkie': ("gpt4o", False),
    'tekken': ("tekken", True),
    'tiny_aya': ("tiny_aya", False),
    'trillion': ("gpt2", False),
    'ufakzeka': ("ufakzeka", False),
    'viking': ("viking", False),
    'youtu': ("youtu", True),
}

# what llama.cpp runs with code of its own (digit grouping, Han-script rules) or without GPT-2's byte
# mapping (SPM-style BPE), which camelid does not reproduce
UNSUPPORTED = {'afmoe', 'kimi-k2', 'whitespace'}
# BPE on raw UTF-8 with spaces as '▁' and no regex split but at newlines (gguf_vocab._spm_style_bpe)
SPM_STYLE = {'gemma4', 'granite-embed-multi-311m', 'sarvam-moe'}
