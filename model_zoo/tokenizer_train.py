"""Deterministic byte-level BPE tokenizers for the randomly initialised test models.

The corpus is the source text of the Python standard library that this interpreter ships,
so every machine using the same venv trains exactly the same tokenizer without any network
access. Training is cheap (a few seconds for a 50k vocabulary), so nothing is downloaded or
checked in; the result is cached per vocabulary size for the lifetime of the process.
"""

from __future__ import annotations

import functools
import json
import sysconfig
from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order matters: the trainer assigns ids in this order, so these get ids 0, 1 and 2.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2's split regex (as in transformers' Qwen2Tokenizer). transformers 5 always rebuilds a
# qwen2 model's tokenizer with this regex, so using it for every model keeps AutoTokenizer and a
# plain tokenizers.Tokenizer.from_file("tokenizer.json") in agreement for all of them.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Test suites carry intentionally malformed or oddly encoded files; site-packages differs
# between environments. Everything else under the stdlib directory is fixed per Python build.
_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_corpus_files(stdlib_dir: Path | None = None) -> list[Path]:
    """Return the corpus files: every stdlib ``*.py`` outside test dirs, sorted by relative path."""
    root = Path(stdlib_dir) if stdlib_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    files = [
        path
        for path in root.rglob("*.py")
        if not _EXCLUDED_DIRS.intersection(path.relative_to(root).parts[:-1])
    ]
    if not files:
        raise RuntimeError(f"no Python sources found under stdlib directory {root}")
    # Sorting by the relative POSIX path makes the order independent of filesystem listing order.
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_corpus(files: Iterable[Path]) -> list[str]:
    """Read files as UTF-8 without newline translation, so the text is byte-for-byte stable."""
    return [path.read_bytes().decode("utf-8", errors="replace") for path in files]


def train_byte_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE whose vocabulary has exactly ``vocab_size`` entries.

    If the corpus is too small to learn enough merges, the vocabulary is padded with
    deterministic filler special tokens ``<|extra_N|>`` (N = 0, 1, ...) so that its size
    still equals ``vocab_size``; such tokens never occur in ordinary encoded text.
    """
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text for arbitrary text.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # Pairs seen once make junk merges. With 2, the ~12 MB CPython 3.11 corpus supports up
        # to ~52.8k tokens, enough for 50272; a smaller stdlib would fall back to padding.
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing < 0:
        raise RuntimeError(f"trainer produced {tokenizer.get_vocab_size()} > {vocab_size} tokens")
    if missing:
        fillers = [AddedToken(f"<|extra_{i}|>", special=True) for i in range(missing)]
        tokenizer.add_special_tokens(fillers)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"vocabulary has {tokenizer.get_vocab_size()} tokens, not {vocab_size}")
    return tokenizer


@functools.lru_cache(maxsize=4)
def stdlib_tokenizer_json(vocab_size: int) -> str:
    """Serialized tokenizer trained on the stdlib corpus (cached: an immutable string)."""
    texts = read_corpus(stdlib_corpus_files())
    return train_byte_bpe(texts, vocab_size).to_str()


def build_chat_tokenizer(
    vocab_size: int, model_max_length: int, *, nfc: bool = False
) -> PreTrainedTokenizerFast:
    """A fresh HF fast tokenizer with ChatML template; never adds BOS/EOS on its own.

    ``nfc`` adds an NFC normalizer: transformers' Qwen2Tokenizer always installs one, so the
    saved tokenizer.json of a qwen2 model must have it too to encode identically.
    """
    backend = Tokenizer.from_str(stdlib_tokenizer_json(vocab_size))
    if nfc:
        backend.normalizer = normalizers.NFC()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length,
        # Byte-level BPE reproduces whitespace exactly; "cleanup" would break round-trips.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    for index, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != index:
            raise RuntimeError(f"special token {token!r} does not have id {index}")
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} entries, expected {vocab_size}")
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, dest: Path) -> None:
    """Save with the chat template inside tokenizer_config.json and explicit no-auto-BOS/EOS."""
    tokenizer.save_pretrained(dest, save_jinja_files=False)
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # Loader bookkeeping that from_pretrained leaks into the saved init kwargs.
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    # Recorded explicitly so loaders that default add_bos_token to True (Llama-style) don't.
    config.setdefault("add_bos_token", False)
    config.setdefault("add_eos_token", False)
    # transformers 5 writes its internal class name; the public alias also loads elsewhere.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
