"""A tiny random-weight Llama and a small byte-level BPE tokenizer with a ChatML template, built in code."""

from __future__ import annotations

import torch
from streamchat.model import LoadedModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello there! How are you today? I am fine, thank you.",
    "Tell me a story about a dragon who lived in a castle by the sea.",
    "What is 2+2? The answer is 4. Numbers 0123456789 and symbols +-*/=()[]{}<>|_.,;:!?'\"",
    "system user assistant You are a tiny test model. Émoji 😀 and 漢字 and ü ö ä",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


# The tiny models' shape: 2 layers, GQA (4 query heads, 2 KV heads), head_dim 16, SDPA.
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "attn_implementation": "sdpa",
}


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """2 layers, GQA (4 query heads, 2 KV heads), head_dim 16, fp32, SDPA."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, **TINY_SHAPE, rope_theta=10000.0, tie_word_embeddings=True, **overrides)
    model = LlamaForCausalLM(config).eval()
    # Larger-than-default weights give peaked attention and logits, so tests can see differences.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.25)
    model.generation_config.eos_token_id = None
    return model


def tiny_qwen(version: int, vocab_size: int, seed: int = 0, **overrides):
    """A tiny random Qwen2 (q/k/v biases, untied head) or Qwen3 (per-head q/k RMSNorm, tied) with tiny_model's
    shapes; biases and norm weights random too, so a misplaced one shows in the logits."""
    torch.manual_seed(seed)
    config_class = {2: Qwen2Config, 3: Qwen3Config}[version]
    options = {"tie_word_embeddings": version == 3, **overrides}
    config = config_class(vocab_size=vocab_size, **TINY_SHAPE, head_dim=16, **options)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 or name.endswith("bias"):
                parameter.normal_(0, 0.25)
            else:  # norm weights
                parameter.normal_(1, 0.2)
    model.generation_config.eos_token_id = None
    return model


def tiny_loaded(seed: int = 0) -> LoadedModel:
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer), seed)
    return LoadedModel(model, tokenizer, identity="tiny-llama", source="tiny", load_seconds=0.0, converted=False)


def shuffled_story(repeats: int, seed: int = 0) -> str:
    """The corpus's words, each used `repeats` times, in a seeded random order: a long text the tiny tokenizer knows."""
    words = " ".join(CORPUS).split()
    order = torch.randperm(len(words) * repeats, generator=torch.Generator().manual_seed(seed)) % len(words)
    return " ".join(words[i] for i in order.tolist())
