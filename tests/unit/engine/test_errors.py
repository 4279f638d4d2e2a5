"""Acceptance 6: bad input gets a typed, clear error — never a crash, a hang or a leaked block."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import main as tandem_main
from orchestrator.core.types import InvalidSamplingParams, SamplingParams, TandemError
from workers.engine import EngineConfig, ops
from workers.engine.errors import (
    CheckpointError,
    DuplicateRequest,
    EngineCapacityError,
    InvalidRequest,
    PromptTooLong,
    UnknownModel,
)

from .factories import greedy, hf_checkpoint, make_engine, prompts, run_to_end


def test_unknown_model_names_presets():
    with pytest.raises(UnknownModel, match="llama-3.2-1b-shape") as info:
        make_engine(model="llama-9-shape")
    assert isinstance(info.value, TandemError)


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    return hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", num_layers=1)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        (lambda d: (d / "config.json").unlink(), "config.json: file is missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json: not valid JSON"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "gpt2"})), "not supported"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama"})), "malformed field"),
        (lambda d: (d / "model.safetensors").unlink(), "no \\*.safetensors"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage"), "model.safetensors: cannot read"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: file is missing"),
        (lambda d: (d / "tokenizer.json").write_text("[]"), "tokenizer.json: cannot read"),
    ],
    ids=["no-config", "bad-json", "arch", "fields", "no-weights", "corrupt-weights", "no-tokenizer", "bad-tokenizer"],
)
def test_broken_checkpoints_raise_checkpoint_error_with_path(tmp_path, good_ckpt, breakage, match):
    d = _copy(good_ckpt, tmp_path / "broken")
    breakage(d)
    with pytest.raises(CheckpointError, match=match) as info:
        make_engine(model=str(d))
    assert str(d) in str(info.value)


def test_missing_or_misshapen_tensor(tmp_path, good_ckpt):
    from safetensors.torch import load_file, save_file

    d = _copy(good_ckpt, tmp_path / "t")
    w = load_file(str(d / "model.safetensors"))
    w.pop("model.layers.0.mlp.up_proj.weight")
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.0.mlp.up_proj.weight'"):
        make_engine(model=str(d))
    w = load_file(str(good_ckpt / "model.safetensors"))
    w["model.norm.weight"] = w["model.norm.weight"][:10]
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight.*expected"):
        make_engine(model=str(d))


def test_bad_requests_are_rejected_without_state_change():
    eng = make_engine(max_model_len=32, num_blocks=8, block_size=4)
    p = prompts(1)[0]
    with pytest.raises(PromptTooLong, match="at most 31"):
        eng.add_request("long", list(range(32)), greedy(4))
    with pytest.raises(InvalidRequest, match="empty"):
        eng.add_request("empty", [], greedy(4))
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        eng.add_request("vocab", [1, 2, 99999], greedy(4))
    for bad in (SamplingParams(max_tokens=0), SamplingParams(temperature=-1.0), SamplingParams(top_p=0.0),
                SamplingParams(top_k=-2), SamplingParams(seed=-1), SamplingParams(stop_token_ids=(-5,))):
        with pytest.raises(InvalidSamplingParams):
            eng.add_request("bad-sampling", p, bad)
        with pytest.raises(InvalidSamplingParams):
            eng.prefill_export("bad-sampling", p, bad)
    with pytest.raises(PromptTooLong):
        eng.prefill_export("long", list(range(40)), greedy(4))
    eng.add_request("dup", p, greedy(4))
    with pytest.raises(DuplicateRequest):
        eng.add_request("dup", p, greedy(4))
    assert not eng.has_unfinished() or list(eng._seqs) == ["dup"]
    run_to_end(eng)


def test_impossible_capacity_is_refused_up_front():
    eng = make_engine(num_blocks=2, block_size=4)  # the context is capped to the cache: 8 tokens
    assert eng.max_model_len == 8
    with pytest.raises(PromptTooLong):
        eng.add_request("x", list(range(9)), greedy(4))
    eng.add_request("ok", list(range(5)), greedy(10))
    assert len(run_to_end(eng)["ok"]) == 3  # stops at the context length
    eng.reserve_kv("hold", eng.kv_layout, 7)  # takes both blocks
    with pytest.raises(EngineCapacityError, match="no progress"):
        eng.generate([[1, 2]], greedy(2))  # would wait forever: generate raises instead of hanging
    eng.release_kv("hold")


def test_failed_forward_pass_fails_requests_and_frees_blocks():
    def broken_decode(*args, **kwargs):
        raise RuntimeError("injected failure")

    ops.register_backend("broken-test", {"paged_attention_decode": broken_decode}, device_type="test")
    try:
        eng = make_engine(ops_backend="broken-test")
        eng.add_request("f", prompts(1)[0], greedy(5))
        first = eng.step()  # prefill works
        assert first[0].finish_reason is None
        failed = eng.step()  # decode raises inside: the request fails, the engine lives on
        assert [(o.request_id, o.finish_reason.value) for o in failed] == [("f", "error")]
        assert not eng.has_unfinished() and eng.num_free_blocks == eng.num_total_blocks
    finally:
        ops.unregister_backend("broken-test")


def test_bad_engine_config():
    with pytest.raises(ValueError, match="kv_dtype"):
        make_engine(kv_dtype="fp4")
    with pytest.raises(ValueError, match="block_size"):
        make_engine(block_size=0)
    with pytest.raises(ops.UnknownOpsBackend):
        make_engine(ops_backend="nope")
    assert EngineConfig().model == "tiny"


def test_cli_generate_json(capsys):
    rc = tandem_main(["generate", "--model", "tiny", "--prompt", "Hello", "--max-tokens", "6", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 6 and isinstance(out["text"], str)
    eng = make_engine()
    assert out["token_ids"] == eng.generate([eng.tokenizer.encode("Hello")], greedy(6))[0]
    rc = tandem_main(["generate", "--model", "tiny", "--prompt-ids", "1,2,3", "--max-tokens", "4", "--json",
                      "--linear", "fp8-dynamic", "--kv-dtype", "fp8_e5m2", "--dtype", "bf16"])
    assert rc == 0 and len(json.loads(capsys.readouterr().out)["token_ids"]) == 4


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--model", "nope", "--prompt", "x", "--max-tokens", "3"], "unknown model"),
        (["--model", "tiny", "--prompt-ids", "1,a", "--max-tokens", "3"], "comma-separated"),
        (["--model", "tiny", "--prompt", "x", "--max-tokens", "0"], "max_tokens"),
        (["--model", "tiny", "--prompt-ids", "1,2,70000", "--max-tokens", "2"], "vocabulary"),
    ],
)
def test_cli_errors_exit_2_with_message(capsys, argv, match):
    assert tandem_main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
