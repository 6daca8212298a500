"""Long runs hold their memory: prompts of many distinct lengths share one compiled prefill graph (its shapes left
open), at their own length, and it computes what a graph of their own shape does. (Op by op, the 6B path, the
memory is measured by benchmarks/soak.py: nothing to count at a tiny size.)"""
import mindspore as ms  # noqa: TID253
import numpy as np
import pytest
from mindspore.graph.api import ms_compile_cache  # noqa: TID253

from glm2_ms import generation
from glm2_ms.api import from_pretrained
from glm2_ms.generation import Decoder, SamplingConfig, cache_length

ms.set_device("CPU")
LENGTHS = range(5, 125, 12)  # 10 distinct prompt lengths over two cache lengths


@pytest.fixture(scope="module")
def model(hf_tiny):
    return from_pretrained(hf_tiny(dtype="float32"))


@pytest.fixture(scope="module")
def decoders(model):
    """Compiled decoders with a prefill graph per prompt length (False) and one open graph (True), kept for the
    module: a shape seen once is not compiled again."""
    return {open_: Decoder(model, jit=True, open_shapes=open_) for open_ in (False, True)}


def prompt(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + n).integers(3, 64000, (1, n), dtype=np.int32)


def compiled_over(decoder: Decoder, lengths, new_tokens: int) -> int:
    """How many graphs `decoder` compiles while generating after prompts of `lengths`."""
    before = len(ms_compile_cache)
    for n in lengths:
        decoder.generate(prompt(n), max_new_tokens=new_tokens)
    return len(ms_compile_cache) - before


def test_many_prompt_lengths_share_one_open_prefill_graph(decoders):
    """The compiled path: over 10 prompt lengths the graphs added are one prefill (shapes open, every prompt at its
    own length) and one decoding step per cache length (MindSpore keeps every graph it compiled); a graph per
    prompt shape, as before, adds one per length."""
    assert decoders[True].compiled_prefill
    assert compiled_over(decoders[True], LENGTHS, 2) <= 1 + len({cache_length(n + 2) for n in LENGTHS}) == 3
    assert compiled_over(decoders[False], LENGTHS, 1) == len(LENGTHS)


def test_op_by_op_prompts_run_at_their_own_length(decoders, monkeypatch):
    """The path of a large model (its prompt op by op): no padding, each prompt at its own shape."""
    decoder, seen = decoders[True], []
    monkeypatch.setattr(decoder, "prefill_step", lambda embedded, *rest, step=decoder.step:
                        seen.append(embedded.shape) or step(embedded, *rest))
    for n in LENGTHS:
        decoder.generate(prompt(n), max_new_tokens=1)
    assert seen == [(1, n, decoder.model.config.hidden_size) for n in LENGTHS]


def test_the_open_graph_gives_the_fixed_graphs_logits_and_tokens(decoders, monkeypatch):
    """An open graph computes what a graph of the prompt's own shape does: each step's logits equal (to float32
    rounding of differently compiled kernels) and the tokens are the same, alone and in a left-padded batch."""
    chosen = []
    monkeypatch.setattr(generation, "choose", lambda logits, *a: chosen.append(logits) or logits.argmax(-1))
    batch = np.concatenate([prompt(40), np.pad(prompt(29), ((0, 0), (11, 0)))])
    mask = (np.arange(40) >= np.array([[0], [11]])).astype(np.int32)
    for ids, attention in [(prompt(7), None), (batch, mask)]:
        runs = []
        for decoder in decoders.values():
            chosen.clear()
            out = decoder.generate(ids, attention, max_new_tokens=3, sampling=SamplingConfig(), eos_token_id=-1)
            runs.append((out, np.stack(chosen)))
        (tokens, logits), (open_tokens, open_logits) = runs
        np.testing.assert_array_equal(open_tokens, tokens)
        np.testing.assert_allclose(open_logits, logits, rtol=0, atol=1e-5)


def test_with_the_native_kernel_the_prompt_runs_op_by_op_not_a_graph_per_length(hf_tiny):
    """MindSpore 2.10 cannot leave an aot custom operator's shapes open, so a model whose weights go through the
    native kernel runs its prompts op by op (at their own length) beside its compiled decoding step: no graph is
    compiled for a prompt, whatever its length."""
    model = from_pretrained(hf_tiny(dtype="float16"), compute_dtype="float32")
    assert model.transformer.output_layer.native
    decoder = Decoder(model, jit=True)
    assert decoder.compiled and not decoder.compiled_prefill
    assert compiled_over(decoder, LENGTHS, 1) == 0
