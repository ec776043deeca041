"""Tiny random checkpoints of every family's real architecture, built with transformers (no download)."""

import torch

# V holds the byte tokenizer's ids, so the same checkpoints train on the built-in tasks
V, WINDOW, SOFTCAP = 264, 8, (0.2, 2.0)
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, attn_implementation="sdpa")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500000.0}

# id -> (transformers config class, model class, config kwargs)
CASES = {
    "llama3.2-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_parameters=LLAMA3)),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM",
                     dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM",
                   dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 16})),
    "llama-dynamic": ("LlamaConfig", "LlamaForCausalLM",
                      dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "qwen2.5-tied-bias": ("Qwen2Config", "Qwen2ForCausalLM",
                          dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW,
                               max_window_layers=1)),
    "qwen2.5-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3-qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 1000000.0}})),
    # soft-capped attention scores and logits (small caps, so they bite on a tiny random model); transformers runs
    # Gemma 2 in eager attention only (SDPA cannot soft-cap)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=SOFTCAP[0],
                    final_logit_softcapping=SOFTCAP[1], attn_implementation="eager")),
    # fused qkv_proj / gate_up_proj; Phi3Config's default pad id (32000) is outside this vocabulary
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW, pad_token_id=None, eos_token_id=2)),
}


def hf_model(case: str, seed: int = 0):
    import transformers

    conf_cls, model_cls, extra = CASES[case]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, conf_cls)(**{**BASE, **extra})).eval()
    with torch.no_grad():  # norms start at ones and biases at zero: randomise them so a mis-mapped one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)
    return model


def load_pretrained(path, case: str):
    """transformers' AutoModelForCausalLM of a saved directory, in the attention `case`'s model runs in."""
    import transformers

    attn = CASES[case][2].get("attn_implementation", BASE["attn_implementation"])
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
