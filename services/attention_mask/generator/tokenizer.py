"""A word-level tokenizer over the reference world's caption vocabulary.

One token per word keeps the class noun a single token, so a class's
cross-attention map is one column of the attention matrix (issue 5 still
merges multi-token words through `token_words`, which also serves BPE
tokenizers such as SD's CLIP). It is a `transformers` fast tokenizer so the
diffusers loader saves and opens it like any other.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from freemask.world import BACKGROUND_WORDS, CLASS_NOUNS, DRAWABLE_BACKGROUNDS, canonical_words, caption_corpus

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
DEFAULT_MAX_LENGTH = 16
# Words of the prompts the services and benchmarks write ("a photo of a dog on the grass").
PROMPT_WORDS = ("a", "an", "photo", "picture", "image", "photograph", "of", "on", "in", "the", "at", "over")


def world_vocabulary(extra_texts: Iterable[str] = (), corpus_size: int = 20_000, seed: int = 0) -> list[str]:
    """Every word the world's captions use, plus prompt words, sorted (so ids are deterministic).

    The caption corpus covers the wording variety; `extra_texts` (e.g. the
    captions of the training scenes) make sure nothing seen in training is unk.
    """
    words: set[str] = set(PROMPT_WORDS) | set(canonical_words()) | set(DRAWABLE_BACKGROUNDS)
    words |= {w for forms in CLASS_NOUNS.values() for pair in forms for w in pair}
    words |= {w for ws in BACKGROUND_WORDS.values() for w in ws}
    pre = _pre_tokenizer()
    for text in (*caption_corpus(corpus_size, seed=seed), *extra_texts):
        words.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    return sorted(words)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Whitespace splits punctuation off words: "dog," -> "dog", ","
    return pre_tokenizers.Whitespace()


def build_tokenizer(words: Iterable[str], max_length: int = DEFAULT_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """A lower-casing WordLevel tokenizer; pad is id 0, unk id 1, words follow in the given order."""
    vocab = {PAD_TOKEN: 0, UNK_TOKEN: 1}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    core.pre_tokenizer = _pre_tokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
                                   model_max_length=max_length, padding_side="right", truncation_side="right")


def token_words(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[tuple[int, str]]:
    """(token position, the whole word it belongs to) for every word token of `prompt`, as the encoder sees it.

    Positions index the padded, truncated sequence the pipeline feeds the
    encoder, so they index the key axis of the cross-attention maps directly.
    Several positions may share a word (a BPE tokenizer splitting "aeroplane");
    special and pad tokens are left out.
    """
    enc = tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_offsets_mapping=True)
    out: list[tuple[int, str]] = []
    word_ids = enc.word_ids()
    spans: dict[int, tuple[int, int]] = {}
    for wid, (start, end) in zip(word_ids, enc["offset_mapping"]):
        if wid is None or start == end:
            continue
        s, e = spans.get(wid, (start, end))
        spans[wid] = (min(s, start), max(e, end))
    for pos, wid in enumerate(word_ids):
        if wid is not None and wid in spans:
            s, e = spans[wid]
            out.append((pos, prompt[s:e].lower()))
    return out
