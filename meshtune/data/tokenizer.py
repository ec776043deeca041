"""Tokenizers: a built-in byte-level tokenizer and a wrapper for Hugging Face `tokenizer.json` files.

    tok = build_tokenizer("byte")                       # no files needed; vocab_size 259
    tok = build_tokenizer("/models/llama")              # its tokenizer.json, tokenizer_config.json, ...
    ids = tok.encode("hello")                           # no special tokens added
    text = tok.decode(ids)

Both expose the same small interface (`encode`, `encode_offsets`, `decode`, `vocab_size`, `pad_id`, `bos_id`,
`eos_id`, `bos`, `stop_ids`, `chat_template`, `special_tokens`) so datasets never need to know which one they
got. `encode` never adds special tokens: the dataset code places BOS/EOS itself, so the prompt/response
boundary used for label masking is exact.
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
    add_bos = True
    stop_ids = (258,)
    chat_template = None  # data.chat_template gives one

    @property
    def bos(self) -> list[int]:
        """The ids plain text starts with."""
        return [self.bos_id]

    @property
    def special_tokens(self) -> dict[str, str]:
        """No special token has a text form (chat templates read none)."""
        return {}

    def encode(self, text: str) -> list[int]:
        """Encodes text as its UTF-8 bytes (no special tokens)."""
        return list(text.encode("utf-8"))

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` and each byte's (start, end) character span."""
        ids, offsets = [], []
        for i, ch in enumerate(text):
            b = ch.encode("utf-8")
            ids += b
            offsets += [(i, i + 1)] * len(b)
        return ids, offsets

    def decode_token(self, token_id: int) -> str:
        """One id as text, special tokens by name (for messages)."""
        names = {self.pad_id: "<pad>", self.bos_id: "<bos>", self.eos_id: "<eos>"}
        return names.get(token_id) or bytes([token_id]).decode("utf-8", errors="replace")

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids back to text, skipping special tokens; invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    import json

    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {path} is not valid JSON ({e}); fix or remove it") from e
    return data if isinstance(data, dict) else {}


class HFTokenizer:
    """A Hugging Face tokenizer folder (or a bare `tokenizer.json`) behind the same interface as `ByteTokenizer`.

    The special tokens, whether BOS is prepended, the stop tokens and the chat template come from the
    folder's files, read as transformers reads them: `tokenizer_config.json` (`bos_token`, `eos_token`,
    `pad_token`, `add_bos_token`, `chat_template`), else `special_tokens_map.json`; `chat_template.jinja`;
    `generation_config.json`'s `eos_token_id` (the ids that end an assistant turn, e.g. Llama 3's
    `<|eot_id|>` and `<|end_of_text|>`). Only a bare `tokenizer.json` with none of them falls back to the
    usual token names.

    Args:
        path: A folder holding `tokenizer.json`, or the path of a `tokenizer.json` file.

    Attributes:
        bos_id / eos_id / pad_id: Token ids; `pad_id` is EOS when the tokenizer has no pad token.
        add_bos: Whether plain text gets BOS first (`add_bos_token`, else what the file's post-processor does).
        stop_ids: The ids that end generation (EOS and generation_config.json's `eos_token_id`).
        chat_template: The folder's chat template, or None.
        special_tokens: `bos_token`, `eos_token`, ... as text, the variables chat templates read.

    Raises:
        ConfigError: The file is missing or unreadable, a configured special token is not in its vocabulary,
            or it has no end-of-sequence token.
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
        file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
        self.path = str(path)
        if not file.is_file():
            raise ConfigError(
                f"data.tokenizer: no such file {file}; give a Hugging Face tokenizer folder or its tokenizer.json, "
                "or data.tokenizer=byte"
            )
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exception subclasses with multi-line text
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"data.tokenizer: {file} is not a valid tokenizer.json ({reason}); "
                "give a Hugging Face tokenizer.json, or data.tokenizer=byte"
            ) from e
        folder = file.parent
        # get_vocab_size(with_added_tokens=True) counts special tokens added after training, which the
        # embedding table must also cover.
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_json(folder / "tokenizer_config.json")
        specials_map = _read_json(folder / "special_tokens_map.json")
        configured = bool(config or specials_map)
        self.special_tokens: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
            text = _token_text(config[key] if key in config else specials_map.get(key))
            if text is not None:
                self.special_tokens[key] = text
        if configured:
            source = folder / ("tokenizer_config.json" if config else "special_tokens_map.json")
            self.bos_id = self._configured("bos_token", source)
            self.eos_id = self._configured("eos_token", source)
            pad = self._configured("pad_token", source)
        else:
            self.bos_id, self.eos_id, pad = (self._find(c) for c in (_BOS_CANDIDATES, _EOS_CANDIDATES, _PAD_CANDIDATES))
        if self.eos_id is None:
            where = f"{folder / 'tokenizer_config.json'} has no eos_token" if configured else (
                f"{file} has none of the end-of-sequence tokens {', '.join(_EOS_CANDIDATES)}")
            raise ConfigError(f"data.tokenizer: {where}; add one as a special token to the tokenizer files")
        # Padding positions always carry label -100, so reusing EOS as pad never teaches the model anything.
        self.pad_id = self.eos_id if pad is None else pad
        if "add_bos_token" in config:
            self.add_bos = bool(config["add_bos_token"]) and self.bos_id is not None
        elif configured:  # what `tokenizer(text)` does in transformers: the file's post-processor decides
            with_special = self._tok.encode("a", add_special_tokens=True).ids
            self.add_bos = self.bos_id is not None and with_special[:1] == [self.bos_id]
        else:  # a bare tokenizer.json: BOS as before
            self.add_bos = True
        if self.bos_id is None:
            # Some tokenizers (GPT-2, Qwen) have no BOS; generation still needs a first token when a prompt is empty.
            self.bos_id = self.eos_id
        gen = _read_json(folder / "generation_config.json").get("eos_token_id")
        gen_ids = [gen] if isinstance(gen, int) else [i for i in gen or [] if isinstance(i, int)]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys([self.eos_id, *gen_ids]))
        self.chat_template = self._template(folder, config)

    def _configured(self, key: str, source: Path) -> int | None:
        text = self.special_tokens.get(key)
        if text is None:
            return None
        token_id = self._tok.token_to_id(text)
        if token_id is None:
            raise ConfigError(f"data.tokenizer: {source}: {key} {text!r} is not in the vocabulary of tokenizer.json; "
                              "fix the token or the file")
        return token_id

    @staticmethod
    def _template(folder: Path, config: dict) -> str | None:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) and template else None

    def _find(self, candidates: tuple[str, ...]) -> int | None:
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    @property
    def bos(self) -> list[int]:
        """The ids plain text starts with: `[bos_id]`, or none for tokenizers that add no BOS (Qwen)."""
        return [self.bos_id] if self.add_bos else []

    def encode(self, text: str) -> list[int]:
        """Encodes text to ids without adding special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` (no special tokens added) and each token's (start, end) character span."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode_token(self, token_id: int) -> str:
        """One id as its token text (special tokens included)."""
        return self._tok.id_to_token(int(token_id)) or f"<id {token_id}>"

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids to text, skipping special tokens."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def build_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """Builds the tokenizer named by `data.tokenizer`.

    Args:
        spec: `byte`, or a Hugging Face tokenizer folder or the path of its `tokenizer.json` file.

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
