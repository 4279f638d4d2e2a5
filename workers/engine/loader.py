"""Model loading: built-in presets (random weights) and local Hugging Face-format directories.

`load_model(model, ...)` returns a `LoadedModel`: the architecture (`ModelConfig`), the weights as a
dict named like Hugging Face Llama checkpoints, a tokenizer and a fingerprint (hash of the config and
of the weights' identity) that makes `KVLayout.model_fingerprint` differ between models.
Nothing is downloaded: a name that is not a preset must be an existing directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from orchestrator.core.model_shape import PRESETS, ModelShape
from workers.engine.errors import CheckpointError, UnknownModel
from workers.engine.model import ModelConfig
from workers.engine.tokenizer import ByteTokenizer, FileTokenizer, Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
# Llama 3.x presets carry Llama-3 RoPE frequency scaling like the released models.
_PRESET_ROPE_SCALING = {
    "llama-3.2-1b-shape": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "llama-3.1-8b-shape": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "llama-3.1-70b-shape": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    fingerprint: str


def _sorted_pairs(d: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    if not d:
        return ()
    return tuple(sorted((str(k), v) for k, v in d.items() if not isinstance(v, (dict, list))))


def _fingerprint(cfg: ModelConfig, identity: str) -> str:
    blob = json.dumps({"config": asdict(cfg), "weights": identity}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def load_model(
    model: str,
    seed: int = 0,
    num_layers: int | None = None,
    device: str = "cpu",
    init_dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load a preset (random weights from `seed`) or a local checkpoint directory."""
    if model in PRESETS:
        return _load_preset(PRESETS[model], seed, num_layers, torch.device(device), init_dtype)
    path = Path(model)
    if not path.is_dir():
        known = ", ".join(sorted(PRESETS))
        raise UnknownModel(
            f"unknown model {model!r}: not a preset ({known}) and not an existing local directory "
            "(nothing is downloaded; pass a directory with config.json, *.safetensors and tokenizer.json)"
        )
    if num_layers is not None:
        raise ValueError("num_layers can only override a random-weight preset, not a checkpoint")
    return _load_dir(path, torch.device(device))


def _load_preset(
    shape: ModelShape, seed: int, num_layers: int | None, device: torch.device, init_dtype: torch.dtype | None
) -> LoadedModel:
    tok = ByteTokenizer()
    layers = num_layers if num_layers is not None else shape.num_layers
    cfg = ModelConfig(
        name=shape.name if num_layers is None else f"{shape.name}[{layers} layers]",
        architecture="llama",
        num_layers=layers,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        rope_scaling=_sorted_pairs(_PRESET_ROPE_SCALING.get(shape.name)),
        rms_norm_eps=1e-5,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=(ByteTokenizer.EOS,),
    )
    weights = random_weights(cfg, seed, device, init_dtype)
    return LoadedModel(cfg, weights, tok, _fingerprint(cfg, f"random-seed:{seed}"))


def random_weights(
    cfg: ModelConfig, seed: int, device: torch.device, init_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Deterministic random weights: linears N(0, 1/fan_in), embeddings N(0, 1), norms ≈ 1.

    init_dtype None: drawn on the host in float32 (the same weights on every device). Otherwise drawn on
    `device` directly in init_dtype (large shapes on a GPU; a different, device-specific draw)."""
    on_device = init_dtype is not None
    g = torch.Generator(device=device if on_device else "cpu").manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        if on_device:
            return torch.randn(shape, generator=g, device=device, dtype=init_dtype).mul_(std)
        return (torch.randn(shape, generator=g) * std).to(device)

    h, hd = cfg.hidden_size, cfg.head_dim
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal((cfg.vocab_size, h), 1.0)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal((cfg.num_heads * hd, h), h**-0.5)
        w[p + "self_attn.k_proj.weight"] = normal((cfg.num_kv_heads * hd, h), h**-0.5)
        w[p + "self_attn.v_proj.weight"] = normal((cfg.num_kv_heads * hd, h), h**-0.5)
        w[p + "self_attn.o_proj.weight"] = normal((h, cfg.num_heads * hd), (cfg.num_heads * hd) ** -0.5)
        w[p + "mlp.gate_proj.weight"] = normal((cfg.intermediate_size, h), h**-0.5)
        w[p + "mlp.up_proj.weight"] = normal((cfg.intermediate_size, h), h**-0.5)
        w[p + "mlp.down_proj.weight"] = normal((h, cfg.intermediate_size), cfg.intermediate_size**-0.5)
        w[p + "input_layernorm.weight"] = 1.0 + normal((h,), 0.1)
        w[p + "post_attention_layernorm.weight"] = 1.0 + normal((h,), 0.1)
    w["model.norm.weight"] = 1.0 + normal((h,), 0.1)
    if not cfg.tie_word_embeddings:
        w["lm_head.weight"] = normal((cfg.vocab_size, h), h**-0.5)
    return w


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(path, "file is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object")
    return data


def config_from_hf(raw: dict[str, Any], path: Path, name: str) -> ModelConfig:
    """Map a Hugging Face config.json (transformers 4.x or 5.x keys) to a ModelConfig."""
    arch = str(raw.get("model_type", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(path, f"model_type {arch!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})")
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        rope_params = dict(raw.get("rope_parameters") or {})
        rope_scaling = dict(raw.get("rope_scaling") or {}) or rope_params
        theta = raw.get("rope_theta") or rope_params.get("rope_theta") or 10000.0
        scaling = {k: v for k, v in rope_scaling.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = {}
        eos = raw.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        max_pos = int(raw.get("max_position_embeddings", 2048))
        window = raw.get("sliding_window")
        if window and (arch == "mistral" or raw.get("use_sliding_window")):
            max_pos = min(max_pos, int(window))  # no sliding-window attention: cap the context instead
        return ModelConfig(
            name=name,
            architecture=arch,
            num_layers=int(raw["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            vocab_size=int(raw["vocab_size"]),
            max_position_embeddings=max_pos,
            rope_theta=float(theta),
            rope_scaling=_sorted_pairs(scaling),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"missing or malformed field ({exc!r})") from exc


def _dir_config(path: Path, weight_names: set[str]) -> tuple[ModelConfig, FileTokenizer]:
    """The architecture and tokenizer of a checkpoint directory (weights not read)."""
    cfg = config_from_hf(_read_json(path / "config.json"), path / "config.json", path.name)
    if "lm_head.weight" not in weight_names and not cfg.tie_word_embeddings:
        raise CheckpointError(path, "lm_head.weight is missing and tie_word_embeddings is false")
    gen = path / "generation_config.json"
    if not cfg.eos_token_ids and gen.is_file():
        eos = _read_json(gen).get("eos_token_id")
        if eos is not None:
            cfg = replace(cfg, eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),))
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(tok_path, "file is missing (the engine reads tokenizers only from tokenizer.json)")
    eos_id = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    return cfg, FileTokenizer(tok_path, cfg.bos_token_id, eos_id)


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(path, "no *.safetensors weight files")
    return files


def _kept(name: str, cfg_tied: bool) -> bool:
    return not name.endswith("rotary_emb.inv_freq") and not (cfg_tied and name == "lm_head.weight")


def _identity_update(identity: Any, name: str, t: torch.Tensor) -> None:
    identity.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    identity.update(t.reshape(-1)[:64].float().cpu().numpy().tobytes())


def _load_dir(path: Path, device: torch.device) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        try:
            weights.update(load_file(str(f), device=str(device)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f, f"cannot read safetensors file ({exc})") from exc
    cfg, tok = _dir_config(path, set(weights))
    weights = {k: v for k, v in weights.items() if _kept(k, cfg.tie_word_embeddings)}
    _check_weights(cfg, weights, path)
    identity = hashlib.sha256()
    for name in sorted(weights):
        _identity_update(identity, name, weights[name])
    return LoadedModel(cfg, weights, tok, _fingerprint(cfg, identity.hexdigest()))


def describe_checkpoint(path: str | Path) -> LoadedModel:
    """Architecture, tokenizer and KV fingerprint of a local checkpoint, reading one tensor at a time.

    The fingerprint equals the one `load_model` gives the same directory, so another engine (vLLM)
    serving it exchanges KV with the native engine. `weights` is empty."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_dir():
        raise UnknownModel(f"{str(path)!r} is not a checkpoint directory")
    handles: dict[str, Path] = {}
    for f in _weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as h:
                handles.update({k: f for k in h.keys()})  # noqa: SIM118 (safe_open is not iterable)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f, f"cannot read safetensors file ({exc})") from exc
    cfg, tok = _dir_config(path, set(handles))
    identity = hashlib.sha256()
    for name in sorted(k for k in handles if _kept(k, cfg.tie_word_embeddings)):
        with safe_open(str(handles[name]), framework="pt") as h:
            _identity_update(identity, name, h.get_tensor(name))
    return LoadedModel(cfg, {}, tok, _fingerprint(cfg, identity.hexdigest()))


def _check_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor], path: Path) -> None:
    h, hd, i_size = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    expected = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        expected |= {
            p + "self_attn.q_proj.weight": (cfg.num_heads * hd, h),
            p + "self_attn.k_proj.weight": (cfg.num_kv_heads * hd, h),
            p + "self_attn.v_proj.weight": (cfg.num_kv_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_heads * hd),
            p + "mlp.gate_proj.weight": (i_size, h),
            p + "mlp.up_proj.weight": (i_size, h),
            p + "mlp.down_proj.weight": (h, i_size),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    if "lm_head.weight" in weights and not cfg.tie_word_embeddings:
        expected["lm_head.weight"] = (cfg.vocab_size, h)
    for name, shape in expected.items():
        if name not in weights:
            raise CheckpointError(path, f"missing tensor {name!r} in the *.safetensors files")
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(path, f"tensor {name!r} has shape {tuple(weights[name].shape)}, expected {shape}")
