"""parrot weights -> Hugging Face names and config.json: the reverse of `checkpoint/hf.py`,
for `parrot quantize gptq --format hf`.

Each parrot tensor (a float one, or a `QuantizedWeight` standing for a Linear's weight)
maps to one or more HF tensors: the fused [q; k; v] and [gate; up] of Llama split back into
their modules; the fused QKV of GPT-NeoX and Falcon is re-laid out from parrot's [q; k; v]
rows to the family's own per-head or per-group order. Rows of a quantized weight move with
their scales and zero points (`QuantizedWeight.select_rows`), so nothing is dequantized.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

from parrot_cli.checkpoint.hf import split_grouped, split_interleaved
from parrot_cli.config import Config
from parrot_cli.quantize.format import QuantizedWeight

Value = torch.Tensor | QuantizedWeight

_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def _falcon_layout(config: Config) -> dict[str, Any]:
    """Which HF Falcon variant computes what this parrot config does (as `_falcon_from_hf`
    reads them): sequential blocks and falcon-7b's multi-query are the old architecture,
    everything else the new one, whose per-group QKV layout with one head per group is the
    old multi-head interleaving."""
    if not config.parallel_residual:
        return {"new_decoder_architecture": False, "parallel_attn": False,
                "multi_query": config.n_query_groups == 1, "grouped": config.n_query_groups == 1}
    if config.n_query_groups == 1 and config.shared_attention_norm:
        return {"new_decoder_architecture": False, "parallel_attn": True, "multi_query": True, "grouped": True}
    return {"new_decoder_architecture": True, "parallel_attn": True, "multi_query": False, "grouped": True,
            "num_ln_in_parallel_attn": 1 if config.shared_attention_norm else 2}


def hf_config(config: Config) -> dict[str, Any]:
    """A transformers config.json for this architecture (float16 weights)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_base}
    if config.rope_scaling:
        rope.update(config.rope_scaling)
    common = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "max_position_embeddings": config.block_size,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id[0] if len(config.eos_token_id) == 1 else (config.eos_token_id or None),
        "torch_dtype": "float16",
        "rope_theta": config.rope_base,
    }
    if config.rope_scaling:
        common["rope_scaling"] = dict(rope)  # the spelling transformers 4 reads
    if config.rotary_percentage != 1.0:
        rope["partial_rotary_factor"] = config.rotary_percentage
    common["rope_parameters"] = rope  # transformers 5
    act = _ACTIVATIONS[config.activation]
    if config.family == "llama":
        out = {
            "architectures": ["MistralForCausalLM" if config.sliding_window else "LlamaForCausalLM"],
            "model_type": "mistral" if config.sliding_window else "llama",
            **common,
            "num_key_value_heads": config.n_query_groups,
            "head_dim": config.head_size,
            "intermediate_size": config.intermediate_size,
            "rms_norm_eps": config.norm_eps,
            "hidden_act": act,
            "attention_bias": config.qkv_bias,
            "mlp_bias": config.mlp_bias,
        }
        if config.rotary_percentage != 1.0:
            out["partial_rotary_factor"] = config.rotary_percentage
        if config.sliding_window:
            out["sliding_window"] = config.sliding_window
        return out
    if config.family == "gpt_neox":
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            **common,
            "intermediate_size": config.intermediate_size,
            "layer_norm_eps": config.norm_eps,
            "hidden_act": act,
            "rotary_pct": config.rotary_percentage,
            "partial_rotary_factor": config.rotary_percentage,
            "rotary_emb_base": config.rope_base,
            "use_parallel_residual": config.parallel_residual,
            "attention_bias": config.qkv_bias,
        }
    layout = _falcon_layout(config)
    return {
        "architectures": ["FalconForCausalLM"],
        "model_type": "falcon",
        **common,
        "num_kv_heads": config.n_query_groups,
        "ffn_hidden_size": config.intermediate_size,
        "layer_norm_epsilon": config.norm_eps,
        "activation": act,
        "alibi": False,
        "bias": config.qkv_bias,
        **{k: v for k, v in layout.items() if k != "grouped"},
    }


def _hf_rows(config: Config) -> torch.Tensor:
    """HF row j of a NeoX/Falcon fused QKV weight is parrot's row index[j]."""
    n = sum(config.qkv_sizes)
    if config.family == "falcon" and _falcon_layout(config)["grouped"]:
        to_parrot = split_grouped(torch.arange(n), config)
    else:
        to_parrot = split_interleaved(torch.arange(n), config)
    # to_parrot[r] = the HF row that parrot row r came from; invert it.
    return torch.argsort(to_parrot)


def _rows(value: Value, index: torch.Tensor | slice) -> Value:
    return value.select_rows(index) if isinstance(value, QuantizedWeight) else value[index]


def hf_tensors(config: Config, name: str, value: Value) -> Iterator[tuple[str, Value]]:
    """The HF (name, tensor) pairs for one parrot tensor."""
    match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name)
    if match is None:
        yield _TOP[config.family].get(name, name), value
        return
    i, rest = int(match[1]), match[2]
    module, _, kind = rest.rpartition(".")
    if config.family == "llama":
        p = f"model.layers.{i}"
        if module == "attn.qkv":
            q, k, _ = config.qkv_sizes
            for part, rows in (("q", slice(0, q)), ("k", slice(q, q + k)), ("v", slice(q + k, None))):
                yield f"{p}.self_attn.{part}_proj.{kind}", _rows(value, rows)
            return
        if module == "mlp.fc":
            m = config.intermediate_size
            yield f"{p}.mlp.gate_proj.{kind}", _rows(value, slice(0, m))
            yield f"{p}.mlp.up_proj.{kind}", _rows(value, slice(m, None))
            return
        names = {"norm_1": "input_layernorm", "norm_2": "post_attention_layernorm",
                 "attn.proj": "self_attn.o_proj", "mlp.proj": "mlp.down_proj"}
        yield f"{p}.{names[module]}.{kind}", value
        return
    if config.family == "gpt_neox":
        p = f"gpt_neox.layers.{i}"
        names = {"norm_1": "input_layernorm", "norm_2": "post_attention_layernorm",
                 "attn.qkv": "attention.query_key_value", "attn.proj": "attention.dense",
                 "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h"}
    else:
        p = f"transformer.h.{i}"
        two_norms = config.parallel_residual and not config.shared_attention_norm
        names = {"norm_1": "ln_attn" if two_norms else "input_layernorm",
                 "norm_2": "ln_mlp" if two_norms else "post_attention_layernorm",
                 "attn.qkv": "self_attention.query_key_value", "attn.proj": "self_attention.dense",
                 "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h"}
    if module == "attn.qkv":
        value = _rows(value, _hf_rows(config))
    yield f"{p}.{names[module]}.{kind}", value


_TOP = {
    "llama": {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
              "transformer.ln_f.bias": "model.norm.bias", "lm_head.weight": "lm_head.weight"},
    "gpt_neox": {"transformer.wte.weight": "gpt_neox.embed_in.weight",
                 "transformer.ln_f.weight": "gpt_neox.final_layer_norm.weight",
                 "transformer.ln_f.bias": "gpt_neox.final_layer_norm.bias", "lm_head.weight": "embed_out.weight"},
    "falcon": {"transformer.wte.weight": "transformer.word_embeddings.weight",
               "transformer.ln_f.weight": "transformer.ln_f.weight", "transformer.ln_f.bias": "transformer.ln_f.bias",
               "lm_head.weight": "lm_head.weight"},
}
