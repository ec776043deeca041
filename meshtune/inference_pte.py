"""Generation through an ExecuTorch program written by `meshtune export RUN --format executorch`.

    program = PteProgram("runs/tiny/executorch/model.pte")   # + model.json and the tokenizer beside it
    ids = program.greedy(program.encode("reverse: abc\\n"), max_new_tokens=16)
    print(program.tokenizer.decode(ids))

The program's one method, `forward(tokens (1, T), input_pos (T,)) -> logits (1, T, V)`, keeps the keys and
values of the positions it has seen in its fixed-size cache: the prompt is fed once (prefill), then one token
at a time (decode). A new sequence starts again at position 0 and overwrites the cache (positions after the
current one are masked), so one loaded program serves any number of sequences, one at a time. Greedy decoding
and stop tokens are those of `meshtune.inference.generate`; the prompt and the new tokens must fit the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from meshtune.config import ConfigError


class PteProgram:
    """A loaded .pte program, its model.json and its tokenizer.

    Args:
        path: the .pte file; `<stem>.json` (model.json) must be beside it.

    Raises:
        ConfigError: naming --program when the file, its model.json or the ExecuTorch runtime is missing.
    """

    def __init__(self, path: str | Path):
        from meshtune.export.program_decoder import load_runtime_ops

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--program: {path} does not exist; write one with `meshtune export RUN_DIR --format "
                              "executorch`")
        meta_file = path.with_suffix(".json")
        if not meta_file.is_file():
            raise ConfigError(f"--program: no {meta_file.name} beside {path}; keep the files `meshtune export "
                              "--format executorch` wrote together")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != "meshtune.executorch":
            raise ConfigError(f"--program: {meta_file} is not a meshtune ExecuTorch config; export it again")
        load_runtime_ops("--program")
        from executorch.runtime import Runtime

        from meshtune.data import build_tokenizer

        self.path, self.max_seq_len = path, int(self.meta["max_seq_len"])
        tok = self.meta["tokenizer"]
        self.tokenizer = build_tokenizer("byte" if tok == "byte" else str(path.parent / tok))
        self.stop_ids = set(self.meta["stop_ids"])
        self.method = Runtime.get().load_program(path).load_method(self.meta["method"])

    def encode(self, text: str) -> list[int]:
        """A text prompt's ids as training encoded it: BOS + text."""
        return [*self.meta["bos"], *self.tokenizer.encode(text)]

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        """Logits (T, V) of `tokens` at positions start.. start + T - 1; caches their keys and values."""
        x = torch.tensor([tokens], dtype=torch.long)
        return self.method.execute([x, torch.arange(start, start + len(tokens))])[0][0]

    def check_room(self, n_prompt: int, max_new_tokens: int) -> None:
        """Raises ConfigError (one line) when a prompt and its new tokens do not fit the program's cache."""
        if n_prompt + max_new_tokens > self.max_seq_len:
            raise ConfigError(f"--max-new-tokens: the prompt's {n_prompt} tokens + {max_new_tokens} new tokens do not "
                              f"fit the KV cache of {self.path} ({self.max_seq_len} positions); lower "
                              f"--max-new-tokens or export again with a larger --max-seq-len")

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Greedy (argmax) continuation of the ids `prompt`: the new ids, without the stop token that ended it.

        Raises:
            ConfigError: when prompt + max_new_tokens exceed the cache (`check_room`), or the prompt is empty.
        """
        if not prompt:
            raise ConfigError("--prompt: empty, and this tokenizer adds no BOS; give some text")
        self.check_room(len(prompt), max_new_tokens)
        out: list[int] = []
        logits = self.forward(prompt, 0)[-1]  # prefill
        for _ in range(max_new_tokens):
            nxt = int(logits.argmax())
            if nxt in self.stop_ids:
                break
            out.append(nxt)
            if len(out) == max_new_tokens:
                break
            logits = self.forward([nxt], len(prompt) + len(out) - 1)[-1]  # decode one
        return out
