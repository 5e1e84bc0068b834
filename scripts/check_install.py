"""Smoke test of an installed gpt2jax (a wheel or sdist in a fresh venv; CI runs it).

Run with the venv's Python from anywhere: ``VENV/bin/python scripts/check_install.py``. It
checks that ``gpt2jax`` is the installed package (not this checkout), then drives the installed
``gpt2jax`` command through a whole round trip on the committed tiny OpenAI checkpoint, in a
temporary directory: convert, info, generate, a two-step fine-tune, its evaluation, exports to
Hugging Face's and OpenAI's formats, and a reload of the export whose logits must equal the
run's. It needs the GPT-2 tokenizer (``TIKTOKEN_CACHE_DIR``, or network). Prints one line per
check and ``N passed, N failed``; exits 1 on any failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def main() -> int:
    import gpt2jax

    passed, failed = 0, 0

    def check(name: str, ok: bool, detail: str = "") -> None:
        nonlocal passed, failed
        passed, failed = passed + ok, failed + (not ok)
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail and not ok else ''}")

    where = Path(gpt2jax.__file__).resolve()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    check("gpt2jax is the installed package", where.is_relative_to(site), str(where))
    exe = Path(sys.executable).parent / "gpt2jax"
    check("the gpt2jax command is installed", exe.is_file(), str(exe))

    def run(*args: str) -> str:
        out = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=work)
        ok = out.returncode == 0
        check("gpt2jax " + " ".join(args), ok, out.stderr[-2000:])
        return out.stdout

    with tempfile.TemporaryDirectory() as work:
        os.environ.setdefault("GPT2JAX_CACHE", os.path.join(work, "cache"))
        data = os.path.join(work, "english.txt")
        Path(data).write_text((FIXTURES / "english.txt").read_text(encoding="utf-8"))
        run("convert", str(FIXTURES / "openai_tiny"), "ckpt")
        check("info names the model", "parameters" in run("info", "ckpt"))
        check("info names the device", "compute dtype" in run("info"))
        text = run("generate", "ckpt", "--prompt", "Once upon a time", "--max-new-tokens", "5",
                   "--seed", "0", "--top-k", "5")  # fmt: skip
        check("generate printed text", len(text.strip()) > 0)
        run("finetune", "ckpt", "--data", data, "--out", "run", "--steps", "2", "--batch-size",
            "2", "--seq-len", "16", "--eval-every", "0", "--sample-every", "0", "--save-every",
            "2")  # fmt: skip
        check("eval gives a loss", "perplexity" in run("eval", "run", "--data", data,
                                                     "--seq-len", "16"))  # fmt: skip
        run("export", "run", "hf")
        run("export", "run", "openai", "--format", "openai")
        import numpy as np

        ids = np.arange(1, 12, dtype=np.int32)
        try:
            logits = {d: np.asarray(gpt2jax.load(os.path.join(work, d)).logits(ids))
                      for d in ("run", "hf", "openai")}  # fmt: skip
        except gpt2jax.Gpt2JaxError as e:
            check("the run and its exports load", False, str(e))
        else:
            for d in ("hf", "openai"):
                same = np.allclose(logits[d], logits["run"], rtol=1e-5, atol=1e-5)
                check(f"the {d} export computes the run's logits", same)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
