"""Check that a `parrot quantize gptq --format hf` directory loads in transformers (through
optimum and gptqmodel) and in gptqmodel's own loader, and that both give the logits parrot
gives for the same checkpoint imported back with `parrot convert`.

Run in the scratch virtualenv of make_fixture.py (transformers + optimum + gptqmodel 7.6):

    GPTQMODEL_CPU_WORKERS=2 /tmp/gptq-venv/bin/python tests/data/gptq/check_interop.py EXPORT_DIR PARROT_LOGITS.pt

PARROT_LOGITS.pt holds {"ids": [...], "logits": tensor [len(ids), vocab]} written by the
project's venv (see the report of issue 11). Prints the largest logit difference per loader.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main() -> None:
    export, reference = Path(sys.argv[1]), torch.load(sys.argv[2], weights_only=True)
    ids = torch.tensor([reference["ids"]])
    want = reference["logits"].float()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, device_map="cpu", dtype=torch.float16)
    with torch.no_grad():
        got = model(ids).logits[0].float()
    print(f"transformers+optimum: max |logit diff| {float((got - want).abs().max()):.4f} "
          f"(logits up to {float(want.abs().max()):.2f})")
    from gptqmodel import GPTQModel

    model = GPTQModel.load(str(export), device="cpu")
    with torch.no_grad():
        got = model.model(ids).logits[0].float()
    print(f"gptqmodel: max |logit diff| {float((got - want).abs().max()):.4f}")


if __name__ == "__main__":
    main()
