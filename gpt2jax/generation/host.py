""":func:`gpt2jax.generate`: text from a loaded model, with a compiled KV-cache sampler.

::

    m = gpt2jax.load("ckpt/124M")
    out = gpt2jax.generate(m, "The meaning of life is", max_new_tokens=50, top_k=40, seed=1)
    print(out[0].text)

The host side: prompts, batches, length buckets (so compilations are reused) and streaming;
the compiled loop is :mod:`gpt2jax.generation.decoding`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.attention import check_name as check_attention
from gpt2jax.config import GPT2Config
from gpt2jax.device import kv_cache_dtype
from gpt2jax.errors import Gpt2JaxError
from gpt2jax.generation import decoding
from gpt2jax.generation.sampling import Sampler
from gpt2jax.loader import Pretrained
from gpt2jax.progress import progress_bar
from gpt2jax.validate import check_number

log = logging.getLogger(__name__)

#: New tokens per sample unless told (at most the model's context).
DEFAULT_NEW_TOKENS = 256
#: Tokens per compiled call when streaming or checking stop strings.
STREAM_CHUNK = 8
MIN_PROMPT_BUCKET = 16
CACHE_BUCKET = 64

Prompts = str | Sequence[str] | Sequence[Sequence[int]] | None
OnToken = Callable[[int, list[int], str], None]


@dataclasses.dataclass(frozen=True)
class Generation:
    """One sample.

    ``tokens``/``text`` are the generated continuation (without a final ``<|endoftext|>`` or
    stop string), preceded by the prompt's when generated with ``include_prompt``.
    ``finish_reason``: ``"eot"`` (sampled ``<|endoftext|>``), ``"stop"`` (produced a stop
    string; ``tokens`` end with the token that completed it), ``"length"``
    (``max_new_tokens`` reached) or ``"context"`` (the model's context is full).
    """

    prompt_index: int
    sample_index: int
    prompt: str
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str

    def to_json(self) -> dict[str, Any]:
        """Every field, as ``gpt2jax generate --out`` writes a sample (one JSON line)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Prompt:
    ids: list[int]  # what the model sees (after truncation); [EOT] when unconditional
    text: str  # the prompt as text ("" when unconditional)


def prompt_bucket(length: int, n_ctx: int) -> int:
    """Prompt slots for a longest prompt of ``length`` tokens: a power of two, capped at n_ctx."""
    return min(max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length()), n_ctx)


def cache_bucket(length: int) -> int:
    """Cache slots for ``length`` tokens (padding included): a multiple of 64."""
    return -(-length // CACHE_BUCKET) * CACHE_BUCKET


def generate(
    model: Pretrained,
    prompts: Prompts = None,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    seed: int = 0,
    num_samples: int = 1,
    batch_size: int = 8,
    stop_at_eot: bool = True,
    stop: Sequence[str] | None = None,
    include_prompt: bool = False,
    truncate_prompt: bool = False,
    compute_dtype: Any = None,
    attention: str | None = None,
    on_token: OnToken | None = None,
    show_progress: bool = False,
) -> list[Generation]:
    """Samples continuations of ``prompts``.

    Prompts are tokenized, grouped into batches of ``batch_size`` rows (``num_samples`` rows per
    prompt; a short last batch is filled with copies of one of its rows), left-padded to a
    common length and run through :mod:`gpt2jax.generation.decoding`: one prefill pass, then a
    compiled ``while_loop`` that stops as soon as every row is done. Each row's result is what
    generating it alone would give, and sample ``(prompt i, sample j)`` draws the same random
    numbers whatever its batch, so the same seed gives the same text (up to float rounding
    differences between batch shapes, which can flip a near-tie).

    **Compilations.** Shapes are rounded up to buckets: the prompt length to a power of two (at
    least 16, at most ``n_ctx``, :func:`prompt_bucket`) and the cache length (prompt bucket +
    new tokens) to a multiple of 64 (:func:`cache_bucket`). One run compiles two programs: the
    prefill, per (batch size, prompt bucket, cache bucket), and the decoding loop, per (batch
    size, cache bucket, greedy or not, ``top_k``, top-p on or off, compute dtype). A later call
    whose prompt falls in the same bucket, or that changes only the seed, temperature,
    ``top_p`` or the prompts' text, reuses both (timings: BENCHMARKS.md).

    **Streaming.** With ``on_token`` (or ``stop`` strings, which are checked on the host) the
    loop runs in chunks of :data:`STREAM_CHUNK` tokens; the cache stays on the device between
    chunks (the state is donated to the next call), so a chunk costs one dispatch and one copy
    of the new token ids to the host (``scripts/bench_generate.py`` compares it with one call).
    A host callback inside the loop (``jax.debug.callback``) would sync with the host every
    token.

    Args:
        model: a :class:`~gpt2jax.loader.Pretrained` (``gpt2jax.load``); its params are
            used in the dtype they were loaded in.
        prompts: a string, a list of strings, a list of token-id lists, or ``None`` for
            unconditional samples (starting from ``<|endoftext|>``, as is an empty prompt).
        max_new_tokens: tokens to generate per sample at most (default: 256, or the model's
            context if smaller); a sample also ends at the end of the model's context (asking
            for more than the context logs a warning).
        temperature, top_k, top_p, greedy: how each token is chosen (``top_k=0`` and
            ``top_p=1`` are off; ``temperature=0`` or ``greedy`` take the argmax).
        seed: samples ``(prompt i, sample j)`` with the same seed get the same randomness.
        num_samples: samples per prompt, independent of ``batch_size``.
        batch_size: rows decoded together (more is faster per token, up to memory).
        stop_at_eot: end a sample at ``<|endoftext|>``.
        stop: strings that end a sample (the text is cut before the first one).
        include_prompt: put the prompt's tokens and text before the generated ones.
        truncate_prompt: keep only the last ``n_ctx - max_new_tokens`` tokens (at least 1) of
            a prompt that would not leave room for them, instead of refusing a prompt that
            fills the context.
        compute_dtype: default: ``model.compute_dtype``. The KV cache is kept in it on
            accelerators, in float32 on a CPU (:func:`gpt2jax.device.kv_cache_dtype`).
        attention: the attention implementation (default: ``model.attention``).
        on_token: streaming callback ``on_token(i, token_ids, text)``, called as tokens
            arrive with the index ``i`` of the sample in the returned list, its new token ids
            and the text they complete (which may be empty, e.g. inside a UTF-8 sequence).
            The texts of one sample add up to its final text (without the prompt).
        show_progress: a progress bar over the samples.

    Returns:
        One :class:`Generation` per sample: prompt 0's samples, then prompt 1's, and so on.
    """
    if max_new_tokens is None:
        max_new_tokens = min(DEFAULT_NEW_TOKENS, model.config.n_ctx)
    elif max_new_tokens > model.config.n_ctx:
        log.warning(context_note(max_new_tokens, model.config.n_ctx))
    sampler = check_settings(
        model.config, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, greedy=greedy, num_samples=num_samples, batch_size=batch_size,
    )  # fmt: skip
    stop = [s for s in (stop or []) if s]
    dtype = jnp.dtype(compute_dtype or model.compute_dtype)
    parsed = _parse_prompts(prompts, model, max_new_tokens, truncate_prompt)

    rows = [(i, j) for i in range(len(parsed)) for j in range(num_samples)]
    batch = min(batch_size, len(rows))
    params = decoding.layer_params(model.params)
    if batch == 1 and _slow_single_row(params):
        batch = 2  # see _slow_single_row
    attention = attention or model.attention
    check_attention(attention)
    decode = _Decoder(model, params, sampler, (dtype, attention), stop_at_eot, stop,
                      max_new_tokens, seed)  # fmt: skip

    results: list[Generation] = []
    with progress_bar(len(rows), "generating", unit="sample", enabled=show_progress) as bar:
        for start in range(0, len(rows), batch):
            real = rows[start : start + batch]
            filled = real + [real[0]] * (batch - len(real))  # a short last batch, filled up

            def stream(k: int, ids: list[int], text: str, start: int = start) -> None:
                on_token(start + k, ids, text)  # type: ignore[misc]

            batch_prompts = [parsed[i].ids for i, _ in filled]
            streams = decode(batch_prompts, filled, len(real), stream if on_token else None)
            for (i, j), s in zip(real, streams, strict=False):
                prompt = parsed[i]
                results.append(
                    Generation(
                        prompt_index=i,
                        sample_index=j,
                        prompt=prompt.text,
                        prompt_tokens=prompt.ids,
                        tokens=(prompt.ids if include_prompt else []) + s.tokens,
                        text=(prompt.text if include_prompt else "") + s.text,
                        finish_reason=s.reason,
                    )
                )
            bar.update(len(real))
    return results


def check_settings(
    config: GPT2Config,
    *,
    max_new_tokens: int | None,
    temperature: float,
    top_k: int,
    top_p: float,
    greedy: bool,
    num_samples: int,
    batch_size: int,
) -> Sampler:
    """The sampler of these settings, each checked (finite, in range) with a message naming its
    argument and flag. (``max_new_tokens`` above the model's context is allowed: a sample ends
    when the context is full; :func:`generate` says so.)"""

    def name(arg: str) -> str:
        return f"{arg} (--{arg.replace('_', '-')})"

    if max_new_tokens is None:
        max_new_tokens = min(DEFAULT_NEW_TOKENS, config.n_ctx)
    check_number(name("max_new_tokens"), max_new_tokens, low=1, integer=True)
    check_number(name("temperature"), temperature, low=0, hint="0 means greedy")
    check_number(name("top_k"), top_k, low=0, integer=True, hint="0: off")
    check_number(name("top_p"), top_p, low=0, high=1, low_open=True, hint="1: off")
    check_number(name("num_samples"), num_samples, low=1, integer=True)
    check_number(name("batch_size"), batch_size, low=1, integer=True)
    return Sampler.make(temperature, top_k, top_p, greedy)


def context_note(max_new_tokens: int, n_ctx: int) -> str:
    """What asking for more new tokens than the context holds gets."""
    return (
        f"max_new_tokens {max_new_tokens} is more than the model's context of {n_ctx} tokens: "
        "each sample ends when the context is full"
    )


def _slow_single_row(params: dict) -> bool:
    """XLA's CPU backend runs 16-bit matmuls fast (YNNPACK) only with at least 2 rows; with
    one it converts every weight to float32 for every token, 2x slower than a 2-row batch."""
    return jax.default_backend() == "cpu" and jnp.dtype(params["wte"].dtype).itemsize == 2


def _parse_prompts(
    prompts: Prompts, model: Pretrained, max_new_tokens: int, truncate: bool
) -> list[_Prompt]:
    """Token ids (validated, truncated when asked) and text of every prompt."""
    config, tokenizer = model.config, model.tokenizer
    if prompts is None:
        items: list = [""]
    elif isinstance(prompts, str):
        items = [prompts]
    else:
        items = list(prompts)
        if not items:
            raise Gpt2JaxError("no prompts given")
    parsed = []
    for n, item in enumerate(items):
        if isinstance(item, str):
            ids = tokenizer.encode(item)
            beyond = [t for t in ids if t >= config.n_vocab]
            if beyond:  # a model made for a smaller vocabulary than GPT-2's tokenizer
                raise Gpt2JaxError(
                    f"prompt {n}: its text has token id {beyond[0]}, outside the model's "
                    f"vocabulary of {config.n_vocab} (n_vocab)"
                )
        else:
            try:
                ids = [int(t) for t in np.asarray(item, dtype=np.int64).reshape(-1)]
            except (TypeError, ValueError):
                raise Gpt2JaxError(
                    f"prompt {n}: expected a string or a list of token ids"
                ) from None
            bad = [t for t in ids if not 0 <= t < config.n_vocab]
            if bad:
                raise Gpt2JaxError(
                    f"prompt {n}: token id {bad[0]} is outside [0, {config.n_vocab})"
                )
        if not ids:  # unconditional: the model starts a new document
            parsed.append(_Prompt([tokenizer.eot], ""))
            continue
        room = max(1, config.n_ctx - max_new_tokens)
        if truncate and len(ids) > room:
            ids = ids[-room:]
            item = None  # the text is now that of the kept tokens
        elif len(ids) >= config.n_ctx:
            raise Gpt2JaxError(
                f"prompt {n} has {len(ids)} tokens, the model's context is {config.n_ctx}: "
                "shorten it or pass truncate_prompt (--truncate-prompt) to keep its end"
            )
        parsed.append(_Prompt(ids, item if isinstance(item, str) else tokenizer.decode(ids)))
    return parsed


def row_keys(seed: int, prompt_index: Sequence[int], sample_index: Sequence[int]) -> jax.Array:
    """PRNG keys ``(B, 2)``: ``fold_in(fold_in(PRNGKey(seed), prompt), sample)`` per row."""
    base = jax.random.PRNGKey(seed)
    fold = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j))
    return fold(jnp.asarray(prompt_index, jnp.uint32), jnp.asarray(sample_index, jnp.uint32))


class _Decoder:
    """Generates one batch: prefill, the decoding loop (in chunks when streaming or stopping
    on strings), then stop strings and streaming callbacks on the host."""

    def __init__(self, model, params, sampler, how, stop_at_eot, stop, max_new_tokens, seed):
        self.config, self.tokenizer = model.config, model.tokenizer
        self.params, self.sampler = params, sampler
        self.dtype, self.attention = how  # compute dtype, attention implementation
        self.cache_dtype = kv_cache_dtype(self.dtype)
        self.stop_token = self.tokenizer.eot if stop_at_eot else -1
        self.stop, self.max_new_tokens, self.seed = stop, max_new_tokens, seed

    def __call__(
        self,
        prompts: list[list[int]],
        rows: list[tuple[int, int]],
        n_real: int,
        on_token: Callable[[int, list[int], str], None] | None,
    ) -> list[_Stream]:
        cfg = self.config
        lengths = np.array([len(p) for p in prompts])
        P = prompt_bucket(int(lengths.max()), cfg.n_ctx)
        budget = np.minimum(self.max_new_tokens, cfg.n_ctx - lengths)  # new tokens per row
        S = cache_bucket(P + int(budget.max()))
        ids = np.zeros((len(prompts), P), np.int32)  # left padding (any valid id: masked out)
        for b, p in enumerate(prompts):
            ids[b, P - len(p) :] = p
        pad = (P - lengths).astype(np.int32)
        last = (P - 1 + budget).astype(np.int32)  # the last slot each row may fill
        keys = row_keys(self.seed, [i for i, _ in rows], [j for _, j in rows])
        state, _ = decoding.prefill_jit(
            cfg, self.params, *jax.device_put((ids, pad, last)), keys, self.sampler,
            self.stop_token, S, self.dtype, self.attention, self.cache_dtype,
        )  # fmt: skip
        streams = [
            _Stream(self.tokenizer, self.stop, self.stop_token, self.max_new_tokens) for _ in rows
        ]
        chunk = STREAM_CHUNK if on_token or self.stop else S
        while True:
            tokens, length, done, index = jax.device_get(
                (state.tokens, state.length, state.done, state.index)
            )
            done = np.array(done)  # writable
            for b, s in enumerate(streams):
                done[b] |= s.update(tokens[b, P : P + length[b]].tolist(), bool(done[b]))
                if on_token and b < n_real:
                    new_ids, text = s.flush()
                    if new_ids or text:
                        on_token(b, new_ids, text)
            if done.all():
                return streams
            state = decoding.decode_jit(
                cfg, self.params, state.replace(done=jnp.asarray(done)),
                min(int(index) + chunk, int(last.max())), self.sampler, self.stop_token, self.dtype,
                self.attention,
            )  # fmt: skip


class _Stream:
    """One row's output as its tokens arrive: the stop token, stop strings, streaming deltas."""

    def __init__(self, tokenizer, stop: list[str], stop_token: int, max_new_tokens: int) -> None:
        self.tokenizer, self.stop, self.stop_token = tokenizer, stop, stop_token
        self.max_new_tokens = max_new_tokens
        self.tokens: list[int] = []  # generated so far, without a stop token, cut at a stop string
        self.text = ""  # their text, cut before a stop string
        self.reason = ""  # why the row ended, once it has
        self.sent_ids = self.sent_text = 0  # how much on_token has been given

    def update(self, tokens: list[int], done: bool) -> bool:
        """Takes the row's tokens so far (``done``: the loop ended the row); True when done."""
        if self.reason:
            return True
        if done and self.stop_token >= 0 and tokens and tokens[-1] == self.stop_token:
            tokens, self.reason = tokens[:-1], "eot"
        elif done:  # out of tokens: the budget, or the context before it
            self.reason = "length" if len(tokens) >= self.max_new_tokens else "context"
        text = self.tokenizer.decode(tokens)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:  # keep the tokens up to the one that completed the first stop string
            n = next(k for k in range(1, len(tokens) + 1) if self._stops(tokens[:k]))
            tokens, text, self.reason = tokens[:n], text[: min(cuts)], "stop"
        self.tokens, self.text = tokens, text
        return bool(self.reason)

    def _stops(self, tokens: list[int]) -> bool:
        text = self.tokenizer.decode(tokens)
        return any(s in text for s in self.stop)

    def flush(self) -> tuple[list[int], str]:
        """New token ids and text since the last flush. Until the row is done, text that may
        still change is held back: an unfinished UTF-8 character, a possible stop string."""
        text = self.text
        if not self.reason:
            text = text.removesuffix("\ufffd")
            held = [n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])]
            text = text[: len(text) - max(held, default=0)]
        new_ids, new_text = self.tokens[self.sent_ids :], text[self.sent_text :]
        self.sent_ids, self.sent_text = len(self.tokens), max(self.sent_text, len(text))
        return new_ids, new_text
