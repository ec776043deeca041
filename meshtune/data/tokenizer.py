"""Tokenizers: a built-in byte-level tokenizer and a wrapper for Hugging Face `tokenizer.json` files.

    tok = build_tokenizer("byte")                       # no files needed; vocab_size 259
    tok = build_tokenizer("/models/llama/tokenizer.json")
    ids = tok.encode("hello")                           # no special tokens added
    text = tok.decode(ids)

Both expose the same small interface (`encode`, `decode`, `vocab_size`, `pad_id`, `bos_id`, `eos_id`) so
datasets never need to know which one they got. `encode` never adds special tokens: the dataset code
places BOS/EOS itself, so the prompt/response boundary used for label masking is exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from meshtune.config import ConfigError

# Searched in order: the first one present in the vocabulary wins. Llama 3 names come before the GPT-2
# `<|endoftext|>` because Llama 3 files also contain other `<|...|>` tokens.
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]", "<|startoftext|>", "<|im_start|>")
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]", "<|eot_id|>", "<|im_end|>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>", "<|padding|>")


class ByteTokenizer:
    """UTF-8 bytes as token ids, plus three special tokens.

    Ids 0-255 are the bytes themselves, then `pad_id=256`, `bos_id=257`, `eos_id=258`. It needs no file,
    so tests and the bundled synthetic tasks run anywhere.
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """Encodes text as its UTF-8 bytes (no special tokens)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids back to text, skipping special tokens; invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class HFTokenizer:
    """A Hugging Face `tokenizers` file (`tokenizer.json`) behind the same interface as `ByteTokenizer`.

    Args:
        path: Path of a `tokenizer.json` file.

    Raises:
        ConfigError: The file is missing or unreadable, or it has no end-of-sequence token.
    """

    def __init__(self, path: str | Path):
        # Imported here so that the byte tokenizer works without the optional `tokenizers` package.
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ConfigError(
                f"data.tokenizer: {path} needs the `tokenizers` package; pip install tokenizers, "
                "or set data.tokenizer=byte"
            ) from e
        self.path = str(path)
        if not Path(path).is_file():
            raise ConfigError(
                f"data.tokenizer: no such file {path}; give the path of a tokenizer.json, or data.tokenizer=byte"
            )
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as e:  # the Rust side raises plain Exception subclasses with multi-line text
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"data.tokenizer: {path} is not a valid tokenizer.json ({reason}); "
                "give a Hugging Face tokenizer.json, or data.tokenizer=byte"
            ) from e
        # get_vocab_size(with_added_tokens=True) counts special tokens added after training, which the
        # embedding table must also cover.
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._find(_BOS_CANDIDATES)
        self.eos_id = self._find(_EOS_CANDIDATES)
        if self.eos_id is None:
            raise ConfigError(
                f"data.tokenizer: {path} has none of the end-of-sequence tokens {', '.join(_EOS_CANDIDATES)}; "
                "add one as a special token to the tokenizer.json"
            )
        pad = self._find(_PAD_CANDIDATES)
        # Padding positions always carry label -100, so reusing EOS as pad never teaches the model anything.
        self.pad_id = self.eos_id if pad is None else pad
        if self.bos_id is None:
            # Some tokenizers (GPT-2) have a single <|endoftext|> used both ways.
            self.bos_id = self.eos_id

    def _find(self, candidates: tuple[str, ...]) -> int | None:
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        """Encodes text to ids without adding special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids to text, skipping special tokens."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def build_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """Builds the tokenizer named by `data.tokenizer`.

    Args:
        spec: `byte`, or the path of a Hugging Face `tokenizer.json` file.

    Returns:
        A tokenizer with `encode`, `decode`, `vocab_size`, `pad_id`, `bos_id` and `eos_id`.

    Raises:
        ConfigError: The spec is empty or the file cannot be used.
    """
    if spec == "byte":
        return ByteTokenizer()
    if not spec:
        raise ConfigError("data.tokenizer: empty; set data.tokenizer=byte or the path of a tokenizer.json")
    return HFTokenizer(spec)
