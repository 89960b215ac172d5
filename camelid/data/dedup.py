"""Exact and near-duplicate detection. Exact: a hash of the text with case and whitespace folded.
Near: MinHash signatures of word 5-gram shingles, looked up in an LSH index (datasketch), as in
Lee et al. 2022 ("Deduplicating training data makes language models better") and RefinedWeb."""

from __future__ import annotations

import hashlib
import re

import numpy as np

NUM_PERM = 128
SHINGLE_WORDS = 5
SCHEME = "affine32"  # datasketch 2: 32-bit hash values
_WORD = re.compile(r"\w+")


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=16).digest()


def minhash_signature(text: str, num_perm: int = NUM_PERM) -> np.ndarray:
    """MinHash of the document's word 5-grams (lowercased, punctuation dropped)."""
    from datasketch import MinHash

    words = _WORD.findall(text.lower())
    n = max(1, len(words) - SHINGLE_WORDS + 1)
    shingles = {" ".join(words[i:i + SHINGLE_WORDS]).encode("utf-8") for i in range(n)}
    mh = MinHash(num_perm=num_perm, seed=1, scheme=SCHEME)
    mh.update_batch(list(shingles))
    return mh.hashvalues


class Deduplicator:
    """Remembers the documents kept so far and says which of them a new document duplicates."""

    def __init__(self, near_threshold: float | None = 0.8, num_perm: int = NUM_PERM):
        self.exact: dict[bytes, str] = {}
        self.near_threshold = near_threshold
        self.num_perm = num_perm
        self.signatures: dict[str, np.ndarray] = {}
        if near_threshold is not None:
            from datasketch import MinHashLSH

            self.lsh = MinHashLSH(threshold=near_threshold, num_perm=num_perm)

    def exact_duplicate(self, key: bytes, source: str) -> str | None:
        """The source of an identical earlier document, or None (and the document is remembered)."""
        if key in self.exact:
            return self.exact[key]
        self.exact[key] = source
        return None

    def near_duplicate(self, signature: np.ndarray, source: str) -> str | None:
        """The source of an earlier document whose estimated Jaccard similarity reaches the threshold."""
        from datasketch import LeanMinHash

        mh = LeanMinHash(seed=1, hashvalues=signature, scheme=SCHEME)
        # LSH returns candidates that share a band; keep only those whose signatures agree often enough.
        for other in self.lsh.query(mh):
            if np.mean(self.signatures[other] == signature) >= self.near_threshold:
                return other
        self.lsh.insert(source, mh)
        self.signatures[source] = signature
        return None
