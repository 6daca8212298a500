"""Long runs hold their memory: prompts of many distinct lengths share a bounded set of prefill shapes (compiled
graphs, or cached operator inputs op by op), and padding a prompt to its bucket changes no output."""
import mindspore as ms
import numpy as np
import pytest
from mindspore.graph.api import ms_compile_cache

from glm2_ms import generation
from glm2_ms.generation import Decoder, SamplingConfig, cache_length, prompt_length
from glm2_ms.loading import from_pretrained

ms.set_device("CPU")
LENGTHS = range(5, 125, 12)  # 10 distinct prompt lengths over two buckets


@pytest.fixture(scope="module")
def model(hf_tiny):
    return from_pretrained(hf_tiny(dtype="float32"))


@pytest.fixture(scope="module")
def decoders(model):
    """Compiled decoders running prompts at their own lengths (False) and padded to buckets (True), kept for the
    module: a shape seen once is not compiled again."""
    return {buckets: Decoder(model, jit=True, buckets=buckets) for buckets in (False, True)}


def prompt(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + n).integers(3, 64000, (1, n), dtype=np.int32)


def test_many_prompt_lengths_compile_a_graph_per_bucket_not_per_length(model, decoders):
    """The compiled path: the graphs added over 10 lengths are at most one prefill per prompt bucket and one
    decoding step per cache length (MindSpore keeps every graph it compiled, and what its nodes produced)."""
    decoder = decoders[True]
    assert decoder.compiled_prefill
    before = len(ms_compile_cache)
    for n in LENGTHS:
        decoder.generate(prompt(n), max_new_tokens=2)
    widths = {prompt_length(n, model.config) for n in LENGTHS}
    assert len(ms_compile_cache) - before <= len(widths) + len({cache_length(w + 2) for w in widths}) == 4


def test_op_by_op_prompts_run_at_one_shape_per_bucket(model, decoders, monkeypatch):
    """The path of a large model (its prompt op by op, where MindSpore keeps each operator's last inputs per
    input shape): as many prefill shapes as buckets."""
    decoder, seen = decoders[True], []
    monkeypatch.setattr(decoder, "compiled_prefill", False)
    monkeypatch.setattr(decoder, "step", lambda embedded, *rest, step=decoder.step:
                        seen.append(embedded.shape) or step(embedded, *rest))
    for n in LENGTHS:
        decoder.generate(prompt(n), max_new_tokens=1)
    assert len(seen) == len(LENGTHS)
    assert len(set(seen)) == len({prompt_length(n, model.config) for n in LENGTHS}) == 2


@pytest.mark.parametrize("compiled_prefill", [True, False])
def test_bucketed_prompts_give_the_unbucketed_logits_and_tokens(decoders, monkeypatch, compiled_prefill):
    """Padding is masked out: each step's logits equal those at the prompt's own length (to float32 rounding of
    the differently shaped matmuls) and the tokens are the same, alone and in a left-padded batch."""
    chosen = []
    monkeypatch.setattr(generation, "choose", lambda logits, *a: chosen.append(logits) or logits.argmax(-1))
    for decoder in decoders.values():
        monkeypatch.setattr(decoder, "compiled_prefill", compiled_prefill)
    batch = np.concatenate([prompt(40), np.pad(prompt(29), ((0, 0), (11, 0)))])
    mask = (np.arange(40) >= np.array([[0], [11]])).astype(np.int32)
    for ids, attention in [(prompt(7), None), (batch, mask)]:
        runs = []
        for decoder in decoders.values():
            chosen.clear()
            out = decoder.generate(ids, attention, max_new_tokens=3, sampling=SamplingConfig(), eos_token_id=-1)
            runs.append((out, np.stack(chosen)))
        (tokens, logits), (bucketed_tokens, bucketed_logits) = runs
        np.testing.assert_array_equal(bucketed_tokens, tokens)
        np.testing.assert_allclose(bucketed_logits, logits, rtol=0, atol=1e-5)
