"""The end of a fine-tuning run is a file the PyTorch world loads: a run fine-tuned for a few
steps exports to Hugging Face format, and transformers' greedy decoding of the export gives the
same tokens as `gpt2jax generate --greedy` on the run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FIXTURES
from gpt2jax.cli.main import main as cli_main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = "The little boat"
NEW_TOKENS = 12


@pytest.mark.slow
def test_finetuned_run_exports_and_greedy_matches_transformers(tmp_path, capsys):
    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    args = [
        "finetune", str(FIXTURES / "openai_tiny"), "--data", str(FIXTURES / "english.txt"),
        "--out", str(run), "--steps", "4", "--batch-size", "2", "--seq-len", "16",
        "--lr", "3e-3", "--save-every", "4", "--eval-every", "0", "--sample-every", "0",
    ]  # fmt: skip
    assert cli_main(args) == 0
    assert cli_main(["export", str(run), str(hf_dir)]) == 0
    out = tmp_path / "samples.jsonl"
    gen = ["generate", str(run), "--prompt", PROMPT, "--greedy", "--no-stop-at-eot"]
    gen += ["--max-new-tokens", str(NEW_TOKENS), "--out", str(out)]
    assert cli_main(gen) == 0
    ours = json.loads(out.read_text().splitlines()[0])

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=tok.eos_token_id,
        )[0, ids.shape[1] :].tolist()
    assert ours["tokens"] == theirs
    # the fine-tuned weights, not the starting checkpoint's, were exported
    from gpt2jax import load

    start, tuned = load(FIXTURES / "openai_tiny"), load(run)
    assert not np.array_equal(start.params["wte"], tuned.params["wte"])
