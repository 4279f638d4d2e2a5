"""Acceptance 1: parity with transformers on small random checkpoints saved locally (float32)."""

from __future__ import annotations

import pytest
import torch

from .factories import greedy, hf_checkpoint, make_engine

CASES = [
    pytest.param("llama", False, True, id="llama-untied-llama3rope"),
    pytest.param("llama", True, True, id="llama-tied-llama3rope"),
    pytest.param("llama", False, False, id="llama-untied-defaultrope"),
    pytest.param("qwen2", False, False, id="qwen2-qkv-bias"),
    pytest.param("mistral", False, False, id="mistral"),
]


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize(("arch", "tied", "llama3_rope"), CASES)
def test_logits_and_greedy_tokens_match_transformers(tmp_path, arch, tied, llama3_rope):
    from transformers import AutoModelForCausalLM

    path = hf_checkpoint(tmp_path / "ckpt", arch=arch, tied=tied, llama3_rope=llama3_rope)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    engine = make_engine(model=str(path), block_size=8, num_blocks=32)
    assert engine.model_config.tie_word_embeddings is tied
    assert engine.model_config.architecture == arch

    prompt = engine.tokenizer.encode("hello tandem, the quick brown fox")
    assert len(prompt) >= 5
    n_new = 24
    ours = engine.generate([prompt], greedy(n_new))[0]
    theirs = _hf_greedy(ref, prompt, n_new)
    assert ours == theirs

    # teacher-forced logits over prompt + generated tokens (positions past the llama3 rope pivot of 32)
    seq = prompt + theirs
    with torch.no_grad():
        ref_logits = ref(torch.tensor([seq])).logits[0].float()
    our_logits = engine.prompt_logits(seq)
    assert our_logits.shape == ref_logits.shape
    assert _rel_err(our_logits, ref_logits) < 1e-4


def test_tokenizer_json_round_trip_and_cli_on_a_directory(tmp_path, capsys):
    import json

    from orchestrator.cli import main as tandem_main

    path = hf_checkpoint(tmp_path / "ckpt")
    engine = make_engine(model=str(path))
    text = "hello world, hello engine"
    ids = engine.tokenizer.encode(text)
    assert engine.tokenizer.decode(ids) == text
    assert engine.eos_token_id == 2
    argv = ["generate", "--model", str(path), "--prompt", text, "--max-tokens", "5", "--json"]
    assert tandem_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_token_ids"] == ids and len(out["token_ids"]) <= 5
    assert out["text"] == engine.tokenizer.decode(out["token_ids"])


def test_fingerprint_differs_between_models(tmp_path):
    a = make_engine(model=str(hf_checkpoint(tmp_path / "a", seed=0)))
    b = make_engine(model=str(hf_checkpoint(tmp_path / "b", seed=1)))
    c = make_engine(model="tiny")
    d = make_engine(model="tiny", seed=1)
    fps = {e.kv_layout.model_fingerprint for e in (a, b, c, d)}
    assert len(fps) == 4
    assert make_engine(model="tiny").kv_layout == c.kv_layout  # stable for the same model
