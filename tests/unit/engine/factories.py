"""Factories for engine tests (reusable by other test packages).

`make_engine(**overrides)` builds an `Engine` on the built-in tiny model (float32, bf16 KV, small cache)
and remembers it; the autouse fixture in this package's conftest calls `assert_no_leaks()` on every
engine a test made. `hf_checkpoint(...)` writes a small random Hugging Face model (+ a locally trained
tokenizer.json) into a directory; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.core.types import SamplingParams
from workers.engine import Engine, EngineConfig

CREATED: list[Engine] = []


def make_engine(**overrides: Any) -> Engine:
    base: dict[str, Any] = {"model": "tiny", "block_size": 16, "num_blocks": 64, "max_batch_size": 8, "seed": 0}
    base.update(overrides)
    engine = Engine(EngineConfig(**base))
    CREATED.append(engine)
    return engine


def greedy(max_tokens: int = 12, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)


def run_to_end(engine: Engine) -> dict[str, list[int]]:
    """Step until idle; tokens per request id."""
    out: dict[str, list[int]] = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            return out
        for o in engine.step():
            out.setdefault(o.request_id, []).append(o.token_id)
    raise AssertionError("engine did not finish within 10000 steps")


def prompts(n: int, base_len: int = 5, vocab: int = 256) -> list[list[int]]:
    """n distinct deterministic prompts of varied lengths."""
    return [[(7 * i + 13 * j + 3) % vocab for j in range(base_len + 3 * i)] for i in range(n)]


CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "prefill is compute bound and decode is memory bound",
    "tandem moves the kv cache between pools as fp8 blocks",
    "hello world, hello tandem, hello engine",
] * 8


def train_tokenizer_json(path: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained on a tiny corpus, saved as tokenizer.json (ids 0,1,2 = unk,bos,eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.save(str(path))


def hf_checkpoint(
    directory: Path, arch: str = "llama", tied: bool = False, llama3_rope: bool = True, seed: int = 0,
    vocab_size: int = 320, num_layers: int = 2,
) -> Path:
    """Save a small random transformers model (GQA 4 query / 2 KV heads) and tokenizer.json into `directory`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, initializer_range=0.15,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
        if llama3_rope:
            rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        model = LlamaForCausalLM(LlamaConfig(rope_parameters=rope, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common))
        with torch.no_grad():  # random (non-zero) q/k/v biases so the bias path is exercised
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    elif arch == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, sliding_window=None, **common))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # non-trivial norm weights
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    train_tokenizer_json(directory / "tokenizer.json", vocab_size)
    return directory
