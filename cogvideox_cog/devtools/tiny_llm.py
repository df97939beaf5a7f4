"""A tiny random Qwen2 instruct model, saved in the layout of the real hub repository.

Tests and the CPU benchmark load it through the same weights cache, `from_pretrained`, chat
template and greedy `generate` as the real prompt-enhancement model (Qwen2.5-1.5B-Instruct),
so only the sizes differ: 100 kB on disk, milliseconds a token. Nothing is fetched: the
byte-level BPE tokenizer is built from the 256 byte symbols alone (no merges), with Qwen's
chat special tokens and a ChatML template shaped like Qwen's. The text it writes is noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Qwen2.5's template without its tool-calling branches: ChatML turns, and the reply's
# turn opened when add_generation_prompt is set.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_PRINTABLE = range(32, 127)  # the bytes of printable ASCII, space included


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE over the 256 byte symbols: any text encodes, one token a byte."""
    symbols = list(bytes_to_unicode().values())
    tokenizer = Qwen2Tokenizer(vocab={s: i for i, s in enumerate(symbols)}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_causal_lm(vocab_size: int, seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2 shaped (grouped-query attention, SwiGLU, RMSNorm, rotary), 2 x 32 wide.

    Its output layer favours printable ASCII (the other rows are zero, the printable ones
    random), so greedy decoding writes readable noise rather than control bytes; it never
    chooses to stop, so every rewrite runs to the token cap.
    """
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
    symbols = bytes_to_unicode()
    keep = torch.zeros(vocab_size, 1)
    keep[[list(symbols).index(b) for b in _PRINTABLE]] = 1.0
    with torch.no_grad():
        model.lm_head.weight.mul_(keep)
    return model


def save_tiny_causal_lm(dest_dir: str | Path, seed: int = 0) -> Path:
    """Write tokenizer, chat template, config, generation config and safetensors weights."""
    dest = Path(dest_dir)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_causal_lm(len(tokenizer), seed)
    ends = tokenizer.convert_tokens_to_ids([IM_END, END_OF_TEXT])
    # As Qwen's: sampling settings, which the rewriter must override to be deterministic.
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.8, eos_token_id=ends, pad_token_id=ends[1]
    )
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest
