"""A small random Llama checkpoint built here (transformers) with a tokenizer trained here (tokenizers).

Nothing is downloaded. The same directory is served by the native engine and by vLLM, so their KV
layouts (and fingerprints) agree and KV can move between them.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    f"request {i}: the prefill pool reads the prompt in one pass; the decode pool emits one token at a time. "
    "KV blocks travel as FP8 over gRPC between heterogeneous accelerators, routed by context length and SLA."
    for i in range(300)
]


def build_tiny_llama(path: Path, seed: int = 0, vocab_size: int = 512) -> Path:
    """Write config.json, model.safetensors (float32), tokenizer.json and tokenizer_config.json."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    return path
