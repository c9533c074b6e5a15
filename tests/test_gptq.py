"""GPTQ: the per-Linear solver on random layers, and `parrot quantize gptq` on tiny random
transformers models of every family (NeoX, Falcon old and new, Llama GQA): they quantize,
load as gptq.int4 with no flag, generate, compute what their dequantized weights compute,
and export to a Hugging Face GPTQ directory that decodes (by this test's own reading of
the published layout, tests/test_hf_gptq.py) to the same weights and logits.

Not covered here yet: the real SmolLM2 perplexity check against RTN and the float model,
and interrupting a run (see the branch's report)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from parrot_cli.errors import UsageError
from parrot_cli.quantize.gptq import (
    MAXQ,
    Hessian,
    QuantizationError,
    gptq_quantize,
    group_params,
    relative_error,
)
from tests.hf_factory import CASES_BY_ID, build
from tests.test_hf_gptq import float_reference, parrot_in_process

# --------------------------------------------------------------------------- the solver


def _layer(n: int = 96, k: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with a few outlier inputs and a Hessian of correlated inputs of uneven
    energy (what real layers look like; on white noise GPTQ has little to exploit)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[:, :4] *= 6
    mix = torch.randn(k, k, generator=gen) * 0.15 + torch.eye(k)
    x = (torch.randn(2048, k, generator=gen) @ mix) * torch.linspace(0.2, 3, k)
    h = Hessian(k, torch.device("cpu"))
    h.add(x)
    return w, h.finish()


def _rtn_same_grid(w: torch.Tensor, group: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest on the very grid GPTQ uses, without its error feedback."""
    out = torch.empty_like(w)
    for g in range(0, w.size(1), group):
        scale, zero = group_params(w[:, g : g + group], sym)
        q = torch.round(w[:, g : g + group] / scale[:, None]).add_(zero[:, None]).clamp_(0, MAXQ)
        out[:, g : g + group] = scale[:, None] * (q - zero[:, None])
    return out


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("act_order", [False, True], ids=["", "act-order"])
@pytest.mark.parametrize("group", [32, 128], ids=["g32", "per-channel"])
def test_gptq_beats_round_to_nearest_on_its_objective(sym, act_order, group):
    w, h = _layer()
    rtn_weight = _rtn_same_grid(w, group, sym)
    result = gptq_quantize(w, h.clone(), group_size=group, sym=sym, act_order=act_order, baseline=rtn_weight)
    qw = result.weight
    rtn = relative_error(w, rtn_weight, h)
    assert result.error < 0.8 * rtn, (result.error, rtn)
    # Errors measured through the damped Cholesky factor equal tr(E H E^T) / tr(W H W^T).
    assert result.error == pytest.approx(relative_error(w, qw.dequantize(), h), rel=1e-3)
    assert result.baseline_error == pytest.approx(rtn, rel=1e-3)
    # The stored weight is exactly what the loop chose: codes and integer zeros in 0..15,
    # scales already bf16 (the kernel's dtype), w = s * (q - z).
    assert qw.scales.dtype == torch.bfloat16 and qw.qzeros.dtype == torch.uint8
    assert int(qw.qzeros.max()) <= 15 and int(qw.codes().max()) <= 15
    if sym:
        assert torch.equal(qw.qzeros, torch.full_like(qw.qzeros, 8))
    assert qw.group_size == group and (qw.perm is not None) == act_order
    if act_order:  # inputs by decreasing activation energy
        assert torch.equal(qw.perm, torch.argsort(torch.diag(h), descending=True, stable=True))
    # The kernel that serves it computes x @ dequant(W)^T (act-order: on x[..., perm]).
    from parrot_cli.quantize.weight_only import Int4Linear

    x = torch.randn(2, 128)
    torch.testing.assert_close(Int4Linear.from_quantized(qw, None)(x),
                               x.to(torch.bfloat16).float() @ qw.dequantize().T, atol=0.03, rtol=0.02)


def test_fused_matrices_quantize_as_their_parts_would():
    """[q; k; v] share one input, so one Hessian: quantizing the stack gives each part what
    quantizing it alone gives (why parrot runs GPTQ once per distinct input)."""
    w, h = _layer(n=96)
    fused = gptq_quantize(w, h.clone(), group_size=32, sym=False, act_order=True).weight
    parts = [gptq_quantize(w[rows], h.clone(), group_size=32, sym=False, act_order=True).weight
             for rows in (slice(0, 64), slice(64, 80), slice(80, 96))]
    torch.testing.assert_close(fused.dequantize(), torch.cat([p.dequantize() for p in parts]), atol=1e-6, rtol=0)
    assert all(torch.equal(p.perm, fused.perm) for p in parts)


def test_dead_inputs_get_zero_weight_and_asym_zero_points_can_be_kept_off_zero():
    w, h = _layer()
    h[:, 5] = h[5, :] = 0  # input 5 never active in calibration
    result = gptq_quantize(w, h.clone(), group_size=32, sym=False, min_zero=1, baseline=w * 0.9)
    assert result.dead == 1
    assert result.error == pytest.approx(relative_error(w, result.weight.dequantize(), h), rel=1e-3)
    assert result.baseline_error == pytest.approx(relative_error(w, w * 0.9, h), rel=1e-3)
    deq = result.weight.dequantize()
    assert torch.equal(deq[:, 5], torch.zeros(96))
    assert int(result.weight.qzeros.min()) >= 1
    # An all-zero group still quantizes (to exact zeros).
    scale, zero = group_params(torch.zeros(4, 32), sym=False)
    assert bool((scale > 0).all()) and torch.equal(zero, torch.zeros(4))


def test_damping_is_raised_when_the_factorisation_fails_and_gives_up_clearly():
    w, _ = _layer(k=64)
    k = 64
    v = torch.ones(k) / k**0.5
    indefinite = torch.eye(k) - 1.5 * torch.outer(v, v)  # one eigenvalue -0.5
    seen = []
    result = gptq_quantize(w, indefinite, group_size=32, sym=True, damp=0.01, on_retry=seen.append)
    assert seen == [0.02, 0.04, 0.08, 0.16, 0.32, 0.64] and result.damp == 0.64 and result.retries == 6
    with pytest.raises(QuantizationError, match="singular even with damping 1; use more calibration --samples"):
        gptq_quantize(w, -torch.eye(k), group_size=32, sym=True)


# --------------------------------------------------------------------------- tiny models

# case -> settings: every family, sym and asym, act-order on and off, groups and per-channel
TINY = {
    "llama-gqa-tied": {"group_size": 32, "sym": False, "act_order": True, "min_zero": 1},
    "neox-parallel-rot25": {"group_size": 32, "sym": False, "act_order": True, "min_zero": 1},
    "falcon-7b-mqa": {"group_size": 32, "sym": True, "act_order": False},
    "falcon-40b-newarch-ln2": {"group_size": -1, "sym": True, "act_order": True},
    "falcon-sequential-bias": {"group_size": 64, "sym": True, "act_order": True},
}


def word_tokenizer(vocab_size: int, directory: Path) -> None:
    """tokenizer.json for a tiny model: ids 0..vocab-1 are the words t0..tN."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "t1", "eos_token": "t2"}))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Each tiny model as a float parrot checkpoint and its GPTQ checkpoint."""
    from parrot_cli.checkpoint.convert import convert
    from parrot_cli.quantize.gptq_checkpoint import quantize_gptq
    from parrot_cli.quantize.gptq_model import GPTQSettings

    root = tmp_path_factory.mktemp("gptq-tiny")
    made = {}
    for case_id, settings in TINY.items():
        case = CASES_BY_ID[case_id]
        hf = build(case, root / case_id / "hf")
        word_tokenizer(case.vocab_size, hf)
        float_dir = convert(hf, root / case_id / "float", dtype="float32")
        rng = random.Random(0)
        text = root / case_id / "calibration.txt"
        text.write_text(" ".join(f"t{rng.randrange(3, case.vocab_size)}" for _ in range(2000)))
        outcome = quantize_gptq(float_dir, output=root / case_id / "gptq", settings=GPTQSettings(**settings),
                                calibration=text, samples=16, seq_len=24, device="cpu", precision="32-true")
        made[case_id] = {"hf": hf, "float": float_dir, "gptq": outcome.target}
    return made


def _dequantized_logits(float_dir: Path, gptq_dir: Path, ids: list[int]) -> torch.Tensor:
    """Logits of parrot's float model of the source with every quantized Linear replaced by
    the dense dequantized weight of the GPTQ checkpoint (what the int4 kernels must compute)."""
    from parrot_cli.checkpoint.info import read_info
    from parrot_cli.checkpoint.load import build_model
    from parrot_cli.checkpoint.store import load_weights
    from parrot_cli.quantize.format import QuantizedWeight
    from parrot_cli.quantize.qconfig import read_quantization_config

    model = build_model(read_info(float_dir).config, float_dir, torch.device("cpu"), torch.float32)
    state = load_weights(gptq_dir)
    for module, meta in read_quantization_config(gptq_dir).modules.items():
        weight = QuantizedWeight.from_tensors(module, state, meta).dequantize()
        model.get_submodule(module).weight = torch.nn.Parameter(weight, requires_grad=False)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


@pytest.mark.parametrize("case_id", list(TINY))
def test_tiny_models_quantize_load_as_gptq_and_generate(case_id, tiny):
    from parrot_cli import LLM
    from parrot_cli.quantize.apply import quantized_layers
    from parrot_cli.quantize.weight_only import Int4Linear

    paths = tiny[case_id]
    qconfig = json.loads((paths["gptq"] / "quantization_config.json").read_text())
    assert qconfig["mode"] == "gptq.int4" and qconfig["method"] == "gptq"
    details = qconfig["details"]
    assert details["calibration"]["samples"] == 16 and len(details["calibration"]["sha256"]) == 64
    assert set(details["layers"]) == set(qconfig["modules"])
    provenance = json.loads((paths["gptq"] / "parrot_config.json").read_text())["provenance"]
    assert provenance["quantized_from"] == str(paths["float"].resolve())

    llm = LLM.load(paths["gptq"], device="cpu", precision="32-true")  # no flag
    assert llm.stored_quantization.mode == "gptq.int4"
    layers = quantized_layers(llm.model)
    assert len(layers) == 4 * llm.config.n_layer and all(isinstance(m, Int4Linear) for m in layers.values())
    act_order = TINY[case_id]["act_order"]
    assert any(m.perm is not None for m in layers.values()) == act_order
    text = llm.generate("t5 t9 t13", max_new_tokens=6, temperature=0)
    assert len(text.split()) >= 3
    # The int4 kernels (with the input permutation) compute what the weights dequantize to.
    ids = [5, 9, 13, 40, 77, 3, 12, 60]
    ref = _dequantized_logits(paths["float"], paths["gptq"], ids)
    assert float((llm.logits(ids) - ref).abs().max()) <= 0.01 * float(ref.abs().max())
    same = LLM.load(paths["gptq"], device="cpu", precision="32-true", quantize="gptq.int4")
    assert torch.equal(same.logits(ids), llm.logits(ids))


@pytest.mark.parametrize("case_id", list(TINY))
def test_hf_export_decodes_to_the_same_weights_and_imports_back(case_id, tiny, tmp_path):
    """The Hugging Face directory written from a GPTQ checkpoint: read by this test's own
    decoder into a transformers float model, it gives parrot's logits; imported back with
    `parrot convert` it holds exactly the same weights."""
    from parrot_cli import LLM
    from parrot_cli.checkpoint.convert import convert
    from parrot_cli.checkpoint.hf_gptq import write_hf_gptq
    from parrot_cli.checkpoint.info import read_info
    from parrot_cli.checkpoint.store import load_weights
    from parrot_cli.quantize.format import QuantizedWeight
    from parrot_cli.quantize.gptq_model import GPTQSettings
    from parrot_cli.quantize.qconfig import read_quantization_config

    paths = tiny[case_id]
    config = read_info(paths["gptq"]).config
    state = load_weights(paths["gptq"])
    modules = read_quantization_config(paths["gptq"]).modules
    entries = [(m + ".weight", QuantizedWeight.from_tensors(m, state, meta)) for m, meta in modules.items()]
    owned = {f"{m}.{k}" for m in modules for k in ("qweight", "scales", "qzeros", "zeros", "perm")}
    entries += [(name, t) for name, t in state.items() if name not in owned]
    export = write_hf_gptq(tmp_path / "hf-gptq", paths["gptq"], config, iter(entries),
                           GPTQSettings(**TINY[case_id]), {})
    hf_config = json.loads((export / "config.json").read_text())
    qc = hf_config["quantization_config"]
    assert qc == json.loads((export / "quantize_config.json").read_text())
    assert (qc["quant_method"], qc["bits"], qc["checkpoint_format"], qc["desc_act"]) == (
        "gptq", 4, "gptq", TINY[case_id]["act_order"])

    gptq_llm = LLM.load(paths["gptq"], device="cpu", precision="32-true")
    ids = [5, 9, 13, 40, 77, 3, 12, 60]
    with torch.no_grad():
        ref = float_reference(export)(torch.tensor([ids])).logits[0]
    mine = gptq_llm.logits(ids)
    # fp16 non-quantized weights in the export, bf16 compute in parrot's kernels
    assert float((mine - ref).abs().max()) <= 0.01 * float(ref.abs().max())

    back = convert(export, tmp_path / "back")
    again = load_weights(back)
    back_modules = read_quantization_config(back).modules
    assert set(back_modules) == set(modules)
    for m, meta in modules.items():
        before = QuantizedWeight.from_tensors(m, state, meta)
        after = QuantizedWeight.from_tensors(m, again, back_modules[m])
        assert torch.equal(before.dequantize(), after.dequantize()), m


# --------------------------------------------------------------------------- bad input


def test_group_size_must_divide_every_layer(tiny):
    from parrot_cli.checkpoint.info import read_info
    from parrot_cli.quantize.gptq_model import GPTQSettings, check_model, valid_group_sizes

    config = read_info(tiny["llama-gqa-tied"]["float"]).config  # inputs 64 and 96
    assert valid_group_sizes(config) == [32, -1]
    with pytest.raises(UsageError, match=r"--group-size 64 does not divide the input size of mlp.proj \(96\); "
                                         r"use --group-size 32 \(or -1"):
        check_model(config, GPTQSettings(group_size=64))
    with pytest.raises(UsageError, match="--group-size 16 is not one torch's int4 kernel takes"):
        check_model(config, GPTQSettings(group_size=16))


def test_cli_refusals_are_one_sentence_with_a_usage_exit_code(tiny, tmp_path):
    llama = tiny["llama-gqa-tied"]
    base = ["quantize", "gptq", "--checkpoint-dir", str(llama["float"]), "-o", str(tmp_path / "out"),
            "--group-size", "32", "--seq-len", "16"]

    def refused(*args, code=2, fragments=()):
        result = parrot_in_process(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == code and len(lines) == 1, result.stderr
        for fragment in fragments:
            assert fragment in lines[0], lines[0]
        assert not (tmp_path / "out").exists()

    refused("quantize", "gptq", "--checkpoint-dir", str(llama["gptq"]),
            fragments=("already holds gptq.int4", "GPTQ needs float weights", str(llama["float"].resolve())))
    refused(*base, "--group-size", "64", fragments=("--group-size 64 does not divide", "use --group-size 32"))
    refused(*base, "--format", "gguf", fragments=("Unknown --format 'gguf'; choose parrot or hf",))
    refused(*base, "--seq-len", "64", fragments=("--seq-len 64 is longer than the model's context (32",))
    refused(*base, "--damp", "0", fragments=("--damp 0.0 is outside (0, 1)",))
    refused(*base, "--calibration", str(tmp_path / "missing.txt"),
            fragments=("The calibration file", "does not exist"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "t5 t6"}\n{"txt": "t1"}\n')
    refused(*base, "--calibration", str(bad), fragments=("bad.jsonl line 2 has no \"text\"",))
    short = tmp_path / "short.txt"
    short.write_text("t5 t6 t7")
    refused(*base, "--calibration", str(short),
            fragments=("has 3 tokens, fewer than one window of --seq-len 16",))
    refused("generate", "t5", "--checkpoint-dir", str(llama["float"]), "--quantize", "gptq.int4",
            fragments=("--quantize gptq.int4 loads a GPTQ checkpoint", "parrot quantize gptq"))


def test_cli_writes_a_hugging_face_directory_from_a_jsonl_file(tiny, tmp_path):
    """The whole command: JSON Lines calibration (too short for the samples asked: a note,
    fewer samples), --format hf (symmetric by default), the summary, the next command."""
    llama = tiny["llama-gqa-tied"]
    calibration = tmp_path / "calibration.jsonl"
    rng = random.Random(1)
    calibration.write_text("".join(
        json.dumps({"text": " ".join(f"t{rng.randrange(3, 112)}" for _ in range(40)), "id": i}) + "\n"
        for i in range(10)))
    result = parrot_in_process("quantize", "gptq", "--checkpoint-dir", str(llama["float"]), "--group-size", "32",
                               "--calibration", str(calibration), "--samples", "64", "--seq-len", "16",
                               "--format", "hf", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    target = llama["float"].parent / "float-gptq-int4-g32-sym-hf"
    assert "holds 25 windows of 16 tokens; calibrating on 25 samples instead of 64" in result.stderr
    assert "GPTQ int4 g32 sym: 2 blocks, 8 layers" in result.stderr
    assert "Mean relative output error" in result.stderr and "MB on disk" in result.stderr
    assert f"parrot convert {target}" in result.stderr
    qc = json.loads((target / "quantize_config.json").read_text())
    assert qc["sym"] is True and qc["group_size"] == 32 and qc["meta"]["calibration"]["samples"] == 25
    assert (target / "tokenizer.json").is_file() and not (target / "parrot_config.json").exists()


def test_an_interrupt_leaves_no_half_checkpoint(tiny, tmp_path):
    """Ctrl-C (or a kill: the CLI turns SIGTERM into the same KeyboardInterrupt) in the
    middle of a run: neither the target nor its .partial directory remains."""
    from parrot_cli.quantize.gptq_checkpoint import quantize_gptq
    from parrot_cli.quantize.gptq_model import GPTQSettings

    llama = tiny["llama-gqa-tied"]
    seen = []

    def progress(done: float, total: int, what: str) -> None:
        seen.append(done)
        if done >= 1:  # the first block is written: interrupt inside the second
            raise KeyboardInterrupt

    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantize_gptq(llama["float"], output=target, settings=GPTQSettings(group_size=32), samples=4,
                      seq_len=16, device="cpu", precision="32-true", progress=progress)
    assert seen and max(seen) >= 1
    assert list(tmp_path.iterdir()) == []
