"""`camelid data prepare`: cleaning steps, quality filters, deduplication, the report, and bad input."""

import json
import subprocess
import sys

import pytest

from camelid.data import clean
from camelid.data.corpus import read_texts
from camelid.data.prepare import PrepareOptions, prepare_corpus
from camelid.data.shards import TokenShards
from camelid.data.tokenize import tokenize_corpus
from camelid.errors import CamelidError
from camelid.tokenizer.train import train_tokenizer

from conftest import SHARED

EMMA = SHARED / "corpora" / "gutenberg" / "Austen, Jane" / "Emma.txt"


def prose(seed: int, words: int = 120) -> str:
    """Distinct, clean English-like documents: the same vocabulary, different orders."""
    import random

    vocab = ("the river ran past old stone houses where children played while their mothers talked about "
             "weather markets harvest letters travel music stories kings ships gardens lanterns winter").split()
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < words:
        sentences.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 12))).capitalize() + ".")
    return " ".join(sentences)


def test_gutenberg_header_and_footer_are_stripped():
    raw = EMMA.read_text(encoding="utf-8")
    book = clean.strip_gutenberg(raw)
    assert clean.is_gutenberg(raw)
    assert "START OF THIS PROJECT GUTENBERG" not in book and "Project Gutenberg" not in book
    assert "Produced by" not in book[:500]
    assert book.lstrip().startswith("EMMA")
    assert "Emma Woodhouse, handsome, clever, and rich" in book
    assert len(book) > 0.9 * len(raw) - 30_000


def test_html_unicode_emoji_and_whitespace():
    page = """<html><head><title>t</title><script>var tracking = 1;</script></head><body>
      <nav><a href="/">Home</a> | <a href="/about">About us</a></nav>
      <article><h1>The lighthouse keeper</h1>
      <p>Every evening the keeper climbed the spiral stairs to light the great lamp above the harbour.</p>
      <p>Ships far out at sea watched for its beam and steered safely between the rocks below.</p></article>
      <footer>Copyright 2024 Example Inc. All rights reserved.</footer></body></html>"""
    text = clean.html_to_text(page)
    assert "spiral stairs" in text and "between the rocks" in text
    assert "tracking" not in text and "About us" not in text
    assert clean.fix_unicode("The Mona Lisa doesnâ€™t have eyebrows.") == "The Mona Lisa doesn't have eyebrows."
    assert clean.emoji_to_text("Great job 👍") == "Great job :thumbs_up:"
    assert clean.emoji_to_text("plain → text") == "plain → text"
    assert clean.normalize_whitespace("a \t b  \r\n\r\n\r\n\r\nc  \n") == "a b\n\nc"


@pytest.mark.parametrize("text,problem", [
    ("too few words here", "too_short"),
    ("a b c d e f g h i j " * 10, "word_length"),
    ("# heading " * 60, "symbols"),
    ("call 0123456789 now " * 30, "digits"),
    ("---- ==== **** word " * 30, "non_alphabetic"),
    ("the same line repeated again and again\n" * 40, "repeated_lines"),
])
def test_quality_rules(text, problem):
    assert clean.quality_problem(text, clean.QualityRules()) == problem
    assert clean.quality_problem(prose(1), clean.QualityRules()) is None


def test_blocklist_matches_whole_words_and_phrases(tmp_path):
    (tmp_path / "block.txt").write_text("# toxic terms\nbadword\nvery bad phrase\n")
    pattern = clean.read_blocklist(tmp_path / "block.txt")
    rules = clean.QualityRules(min_words=1)
    assert clean.quality_problem("this has a BadWord in it", rules, pattern) == "blocklist"
    assert clean.quality_problem("a very  bad phrase", rules, pattern) is None  # whitespace is exact
    assert clean.quality_problem("a very bad phrase here", rules, pattern) == "blocklist"
    assert clean.quality_problem("badwords are a different word", rules, pattern) is None
    with pytest.raises(CamelidError, match="missing.txt: cannot read the blocklist"):
        clean.read_blocklist(tmp_path / "missing.txt")


@pytest.fixture()
def raw_corpus(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    docs = [prose(i) for i in range(30)]
    near = docs[0].split()
    near[10] = near[10] + "s"  # one word of 120 changed: a near-duplicate
    records = [{"text": d} for d in docs] + [
        {"text": docs[1].upper().replace(". ", ".   ")},  # exact duplicate once case and spaces are folded
        {"text": " ".join(near)},
        {"text": "short"},
        {"text": docs[2] + " A badword appears."},
    ]
    (src / "web.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (src / "page.html").write_text(f"<html><body><nav>Menu</nav><article><p>{prose(99)}</p></article></body></html>")
    (src / "blob.txt").write_bytes(b"\x00\x01binary\x00")
    (src / "latin1.txt").write_bytes(("caf\xe9 " * 80).encode("latin-1"))
    (tmp_path / "block.txt").write_text("badword\n")
    return src, tmp_path / "block.txt"


def test_prepare_report_dedup_and_split(raw_corpus, tmp_path):
    src, block = raw_corpus
    out = tmp_path / "prepared"
    report = prepare_corpus([src], out, PrepareOptions(val_fraction=0.2, blocklist=str(block), workers=2))
    assert report["documents_in"] == 35
    assert report["skipped_files"] == {"binary": 1, "not_utf8": 1}
    removed = report["removed"]
    assert removed["exact_duplicate"]["documents"] == 1
    assert removed["near_duplicate"]["documents"] == 1
    assert removed["near_duplicate"]["examples"][0]["duplicate_of"].endswith("web.jsonl:1")
    assert removed["too_short"]["documents"] == 1 and removed["blocklist"]["documents"] == 1
    assert report["cleaning"]["html"]["documents"] == 1
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (out / "val.jsonl").read_text().splitlines()]
    assert len(train) + len(val) == 31 == report["documents_train"] + report["documents_val"]
    assert val and train and not {r["text"] for r in train} & {r["text"] for r in val}
    assert any(r["source"].endswith("page.html") and "Menu" not in r["text"] for r in train + val)
    assert "near_duplicate" in (out / "report.md").read_text()
    assert not (tmp_path / "prepared.partial").exists()

    # The prepared folder feeds the tokenizer trainer and the shard writer, keeping its split.
    tok = train_tokenizer(read_texts([out]), tmp_path / "tok", vocab_size=300)
    shards = tokenize_corpus([str(out)], tok, tmp_path / "shards", workers=1)
    assert shards["train"]["documents"] == len(train) and shards["val"]["documents"] == len(val)
    assert TokenShards(tmp_path / "shards" / "val").index["documents"] == len(val)


def test_prepare_bad_input_leaves_nothing_behind(tmp_path):
    (tmp_path / "tiny.txt").write_text("only a few words")
    with pytest.raises(CamelidError, match="corpus is empty after cleaning"):
        prepare_corpus([tmp_path / "tiny.txt"], tmp_path / "out", PrepareOptions(workers=1))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp-camelid").exists()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": prose(1)}) + "\n{broken\n")
    with pytest.raises(CamelidError, match="bad.jsonl:2"):
        prepare_corpus([tmp_path / "bad.jsonl"], tmp_path / "out", PrepareOptions(workers=1))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp-camelid").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("keep me")
    with pytest.raises(CamelidError, match="taken: exists and is not a camelid output"):
        prepare_corpus([tmp_path / "bad.jsonl"], tmp_path / "taken")
    assert (tmp_path / "taken" / "precious.txt").read_text() == "keep me"
    with pytest.raises(CamelidError, match="nope: no such file"):
        prepare_corpus([tmp_path / "nope"], tmp_path / "out")


def test_prepare_cli(raw_corpus, tmp_path):
    src, _ = raw_corpus
    run = [sys.executable, "-m", "camelid", "data", "prepare"]
    ok = subprocess.run(run + [str(src), "--out", str(tmp_path / "o"), "--workers", "1"], capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    assert "near_duplicate" in ok.stdout and (tmp_path / "o" / "report.json").exists()
    bad = subprocess.run(run + [str(src), "--out", str(tmp_path / "o2"), "--near-dup", "1.5"], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == "camelid: error: --near-dup must be in [0, 1]"
