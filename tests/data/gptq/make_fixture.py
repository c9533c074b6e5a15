"""Make tests/data/gptq/<case>/: a tiny GPTQ checkpoint quantized by gptqmodel, an
implementation independent of parrot's, for the import tests.

Run it in a scratch virtualenv with gptqmodel 7.6 beside the project's torch (never in the
project's own venv; gptqmodel is not a parrot dependency):

    python3 -m venv /tmp/gptq-venv
    /tmp/gptq-venv/bin/pip install torch==2.13.0
    /tmp/gptq-venv/bin/pip install -c <(echo torch==2.13.0) gptqmodel==7.6.0 transformers optimum accelerate
    GPTQMODEL_CPU_WORKERS=2 PYTHONPATH=. /tmp/gptq-venv/bin/python tests/data/gptq/make_fixture.py

The float model comes from tests/hf_factory.py (random weights, seed 0), with a word-level
tokenizer over its 112 ids so gptqmodel can load it; calibration is 64 random sequences
of 32 tokens. The float model is not kept (the tests rebuild it from the same factory).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# case id -> gptqmodel QuantizeConfig arguments
FIXTURES = {
    "llama-gqa-g32-asym-actorder": ("llama-bias", {"bits": 4, "group_size": 32, "desc_act": True, "sym": False}),
    "neox-g32-sym": ("neox-parallel-rot25", {"bits": 4, "group_size": 32, "desc_act": False, "sym": True}),
    "falcon-newarch-gc-sym-actorder": ("falcon-40b-newarch-ln2",
                                       {"bits": 4, "group_size": -1, "desc_act": True, "sym": True}),
}


def word_tokenizer(vocab_size: int, out_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1",
                                   eos_token="t2")
    fast.save_pretrained(out_dir)


def main() -> None:
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    from tests.hf_factory import CASES_BY_ID, build

    for name, (case_id, qargs) in FIXTURES.items():
        case = CASES_BY_ID[case_id]
        with tempfile.TemporaryDirectory() as tmp:
            src = build(case, Path(tmp) / "float", seed=0)
            word_tokenizer(case.vocab_size, src)
            gen = torch.Generator().manual_seed(0)
            calibration = [
                {"input_ids": torch.randint(3, case.vocab_size, (32,), generator=gen).tolist(),
                 "attention_mask": [1] * 32}
                for _ in range(64)
            ]
            model = GPTQModel.load(str(src), QuantizeConfig(**qargs, offload_to_disk=False), device="cpu")
            model.quantize(calibration, batch_size=8)
            out = HERE / name
            if out.exists():
                shutil.rmtree(out)
            model.save(str(out))
        for junk in out.glob("*"):
            if junk.suffix not in (".json", ".safetensors") or junk.name.startswith("tokenizer"):
                junk.unlink()
        meta = {"case": case_id, "seed": 0, "quantize_config": qargs, "gptqmodel": gptqmodel.__version__,
                "torch": torch.__version__}
        (out / "fixture.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(name, sorted(p.name for p in out.iterdir()), file=sys.stderr)


if __name__ == "__main__":
    main()
