"""Document cleaning and quality filters for pretraining corpora.

Each step is a plain function of a string. The quality rules follow Gopher's (Rae et al. 2021, appendix A)
and C4's, with thresholds in `QualityRules` so a corpus of poems or code can loosen them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from camelid.errors import CamelidError

# Project Gutenberg wraps every book in a licence header and footer; the wording changed over the decades.
_GUTENBERG_START = re.compile(
    r"^\W*(\*+\s*START OF (THIS|THE) PROJECT GUTENBERG|\*END\*?\s*THE SMALL PRINT|START OF THE PROJECT GUTENBERG)"
    r".*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(
    r"^\W*(\*+\s*END OF (THIS|THE) PROJECT GUTENBERG|END OF (THIS |THE )?PROJECT GUTENBERG|"
    r"End of the Project Gutenberg|End of Project Gutenberg).*$", re.IGNORECASE | re.MULTILINE)
_PRODUCED_BY = re.compile(r"\A\s*(Produced by|This etext was (produced|prepared) by|E-text prepared by)"
                          r".*?(\n\s*\n|\Z)", re.IGNORECASE | re.DOTALL)


def is_gutenberg(text: str) -> bool:
    return "project gutenberg" in text[:5000].lower()


def strip_gutenberg(text: str) -> str:
    """The book between the licence header and footer, without the "Produced by" credit."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return _PRODUCED_BY.sub("", text, count=1)


def html_to_text(html: str) -> str:
    """Main content of a web page (boilerplate, menus and scripts removed) with trafilatura, the extractor
    RefinedWeb and FineWeb use; an empty string when the page has no main text."""
    import trafilatura

    return trafilatura.extract(html, include_comments=False, include_tables=True, deduplicate=True) or ""


def fix_unicode(text: str) -> str:
    """Mojibake, HTML entities left in text, curly-quote damage and odd line breaks, repaired by ftfy."""
    import ftfy

    return ftfy.fix_text(text, normalization="NFC")


# Pictographs, dingbats, symbols and flags; a cheap test that spares most documents the full emoji scan.
_MAYBE_EMOJI = re.compile("[\u2190-\u2bff\u3030\u303d\u3297\u3299\U0001f000-\U0001faff\U000e0020-\U000e007f]")


def emoji_to_text(text: str) -> str:
    """Emoji become their names (":thumbs_up:"), which a small vocabulary can spell."""
    if not _MAYBE_EMOJI.search(text):
        return text
    import emoji

    return emoji.demojize(text, delimiters=(":", ":"))


_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Unix line ends, runs of spaces collapsed, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


@dataclass
class QualityRules:
    min_words: int = 50
    max_words: int = 10_000_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_ratio: float = 0.1  # "#" and "..." per word
    max_digit_ratio: float = 0.2  # digits per character
    min_alpha_words: float = 0.8  # share of words with at least one letter
    max_duplicate_lines: float = 0.3  # share of lines that repeat an earlier line
    max_bullet_lines: float = 0.9


def quality_problem(text: str, rules: QualityRules, blocklist: re.Pattern | None = None) -> str | None:
    """The name of the first rule the document breaks, or None when it passes them all."""
    words = text.split()
    n = len(words)
    if n < rules.min_words:
        return "too_short"
    if n > rules.max_words:
        return "too_long"
    mean = sum(map(len, words)) / n
    if not rules.min_mean_word_length <= mean <= rules.max_mean_word_length:
        return "word_length"
    if (text.count("#") + text.count("...") + text.count("\u2026")) / n > rules.max_symbol_ratio:
        return "symbols"
    if sum(c.isdigit() for c in text) / len(text) > rules.max_digit_ratio:
        return "digits"
    if sum(any(c.isalpha() for c in w) for w in words) / n < rules.min_alpha_words:
        return "non_alphabetic"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if lines:
        if (len(lines) - len(set(lines))) / len(lines) > rules.max_duplicate_lines:
            return "repeated_lines"
        if sum(line[0] in "-*•·‣◦" for line in lines) / len(lines) > rules.max_bullet_lines:
            return "bullet_lines"
    if blocklist is not None and blocklist.search(text):
        return "blocklist"
    return None


def read_blocklist(path) -> re.Pattern | None:
    """One word or phrase per line (blank lines and # comments ignored), matched as whole words, any case."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CamelidError(f"{path}: cannot read the blocklist ({exc.__class__.__name__})") from None
    terms = sorted({t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")}, key=len, reverse=True)
    if not terms:
        return None
    return re.compile(r"(?<!\w)(" + "|".join(re.escape(t) for t in terms) + r")(?!\w)", re.IGNORECASE)
