"""Tokenizer folders for the four chat-template styles, written the way their Hugging Face releases lay them out.

    folder = write_tokenizer(tmp_path, "llama3")       # tokenizer.json, tokenizer_config.json, generation_config.json
    hf = transformers.AutoTokenizer.from_pretrained(folder)

Each style's `template` is the release's own chat template (tools left out); `marked` renders the same text with
`{% generation %}` around each assistant turn's content and end-of-turn text, so transformers'
`return_assistant_tokens_mask` gives the mask meshtune must find by rendering prefixes. A byte-level BPE is trained
in the test on a small chat corpus; the special tokens are added tokens, as in the releases.
"""

from __future__ import annotations

import json
from pathlib import Path

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_MARKED = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5-Instruct's template without its tool branches
CHATML = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
CHATML_MARKED = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "assistant" %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}{{- message.content + '<|im_end|>' + '\\n' }}{% endgeneration %}
    {%- elif (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_MARKED = MISTRAL.replace("{{ message['content'] + eos_token}}",
                                 "{% generation %}{{ message['content'] + eos_token}}{% endgeneration %}")
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA_MARKED = GEMMA.replace(
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}",
    "{{ '<start_of_turn>' + role + '\n' }}{% if role == 'model' %}{% generation %}"
    "{{ message['content'] | trim + '<end_of_turn>\n' }}{% endgeneration %}{% else %}"
    "{{ message['content'] | trim + '<end_of_turn>\n' }}{% endif %}")

# per style: template, marked template, tokenizer_config special tokens, whether the post-processor adds BOS,
# generation_config eos_token_id (as token texts)
STYLES = {
    "llama3": dict(template=LLAMA3, marked=LLAMA3_MARKED, add_bos=True,
                   specials=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
                   stops=["<|end_of_text|>", "<|eot_id|>"],
                   added=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>", "<|finetune_right_pad_id|>"]),
    "chatml": dict(template=CHATML, marked=CHATML_MARKED, add_bos=False,
                   specials=dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                   stops=["<|im_end|>", "<|endoftext|>"],
                   added=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "mistral": dict(template=MISTRAL, marked=MISTRAL_MARKED, add_bos=True,
                    specials=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
                    stops=["</s>"], added=["<unk>", "<s>", "</s>"]),
    "gemma": dict(template=GEMMA, marked=GEMMA_MARKED, add_bos=True,
                  specials=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"),
                  stops=["<eos>", "<end_of_turn>"],
                  added=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]),
}

CORPUS = [
    "You are a helpful assistant. Answer briefly and politely.",
    "What is the capital of France? The capital of France is Paris.",
    "Sort these letters: d b a c. Sorted: a b c d.",
    "Reverse the word hello. The reverse is olleh.",
    "Add 12 and 30. The sum is 42. Thanks! You are welcome.",
    "system user assistant model INST Qwen Alibaba Cloud created",
]

CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."},
     {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": "You are welcome."}],
    [{"role": "user", "content": "Sort these letters: d b a c"},
     {"role": "assistant", "content": "a b c d"}],
    [{"role": "user", "content": "Add 12 and 30."},
     {"role": "assistant", "content": " The sum is 42. "},
     {"role": "user", "content": "Reverse the word hello."},
     {"role": "assistant", "content": "olleh"}],
]


def no_system(conversation: list[dict]) -> list[dict]:
    """Mistral's and Gemma's templates refuse a system turn: fold it into the first user turn."""
    if conversation[0]["role"] != "system":
        return conversation
    first = dict(conversation[1], content=conversation[0]["content"] + "\n\n" + conversation[1]["content"])
    return [first, *conversation[2:]]


def write_tokenizer(root: Path, style: str, template: str | None = None) -> Path:
    """A tokenizer folder of `style` under root/style; `template` replaces the style's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    spec = STYLES[style]
    folder = Path(root) / style
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=spec["added"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    bos = spec["specials"]["bos_token"]
    if spec["add_bos"]:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template or spec["template"],
              "model_max_length": 4096, **spec["specials"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    stops = [tok.token_to_id(t) for t in spec["stops"]]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
    return folder
