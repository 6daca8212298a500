"""The forms users know from transformers and THUDM's code (`from_pretrained`, `generate`, `chat`, `stream_chat`)
give what the Decoder underneath gives."""
import inspect
import pkgutil

import mindspore as ms  # noqa: TID253
import numpy as np
import pytest

import glm2_ms
import glm2_ms.api
import glm2_ms.cli
from glm2_ms import GLM2ForCausalLM, GLM2Tokenizer, SamplingConfig
from glm2_ms.api import from_pretrained
from glm2_ms.dialogue import chat, role_response, stream_chat

QUERY = "晚上睡不着应该怎么办"


@pytest.fixture(scope="module")
def folder(ms_tiny):
    return ms_tiny("float32")


@pytest.fixture(scope="module")
def model(folder):
    return GLM2ForCausalLM.from_pretrained(folder, dtype="float32")


@pytest.fixture(scope="module")
def tok(folder):
    return GLM2Tokenizer.from_pretrained(folder)


def test_from_pretrained_is_the_loader(folder, model, tok):
    assert isinstance(model, GLM2ForCausalLM) and tok.encode(QUERY) == GLM2Tokenizer(folder).encode(QUERY)
    ids = ms.Tensor([tok.encode(QUERY)], ms.int32)
    np.testing.assert_array_equal(model(ids).asnumpy(), from_pretrained(folder, dtype="float32")(ids).asnumpy())
    half = GLM2ForCausalLM.from_pretrained(folder, dtype="float16")
    assert half.transformer.embedding.embedding_weight.dtype == ms.float16


def test_generate_returns_prompt_and_new_tokens_as_the_decoder_does(model, tok):
    prompt = np.array([tok.build_chat_input(QUERY)], np.int32)  # the chat test's prompt: its compiled steps serve both
    mask = np.ones_like(prompt)
    want = model.decoder.generate(prompt, mask, max_new_tokens=6)
    got = model.generate(ms.Tensor(prompt), ms.Tensor(mask), max_new_tokens=6)
    assert isinstance(got, ms.Tensor) and got.dtype == ms.int32
    np.testing.assert_array_equal(got.asnumpy(), want)
    np.testing.assert_array_equal(got.asnumpy()[:, :prompt.shape[1]], prompt)
    sampled = model.generate(prompt.tolist(), max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.5,
                             top_k=40, seed=3)
    assert isinstance(sampled, np.ndarray)
    np.testing.assert_array_equal(sampled, model.decoder.generate(
        prompt, max_new_tokens=6, sampling=SamplingConfig(greedy=False, temperature=1.5, top_k=40, top_p=0.9, seed=3)))
    assert model.generate(prompt, max_length=prompt.shape[1] + 2).shape == (1, prompt.shape[1] + 2)


def test_chat_and_stream_chat_as_thudm_return_them(model, tok):
    greedy = SamplingConfig()
    reply, history = model.chat(tok, QUERY, history=[], max_new_tokens=6, do_sample=False)
    prompt = np.array([tok.build_chat_input(QUERY)], np.int32)
    out = model.decoder.generate(prompt, max_new_tokens=6, eos_token_id=tok.eos_id)
    assert reply == tok.decode(out[0, prompt.shape[1]:]).strip() and history == [(QUERY, reply)]
    assert (reply, history) == chat(model.decoder, tok, QUERY, [], 6, greedy)
    again, longer = model.chat(tok, "你好", history=history, max_new_tokens=6, do_sample=False)
    assert longer[0] == (QUERY, reply) and longer[1] == ("你好", again)
    steps = list(model.stream_chat(tok, QUERY, history=[], max_new_tokens=6, do_sample=False))
    assert steps == list(stream_chat(model.decoder, tok, QUERY, [], 6, greedy))
    assert steps[-1] == (reply, history) and all(r.startswith(steps[0][0]) for r, _ in steps)
    assert all(h == [(QUERY, r)] for r, h in steps)
    sampled = model.chat(tok, QUERY, max_new_tokens=6, seed=5)  # THUDM's defaults: sampling, top_p 0.8, temp 0.8
    assert sampled == chat(model.decoder, tok, QUERY, None, 6, SamplingConfig(False, 0.8, 0, 0.8, seed=5))


def test_role_family_chat_keeps_message_history(model, folder):
    """ChatGLM3's format on the same weights: role-token prompt, generation stops at eos, <|user|> or
    <|observation|>, history as THUDM's ChatGLM3 keeps it (dicts), stream_chat ending where chat ends."""
    glm3 = GLM2Tokenizer(folder, family="chatglm3")
    reply, history = model.chat(glm3, QUERY, max_new_tokens=6, do_sample=False)
    prompt = np.array([glm3.build_chat_input(QUERY)], np.int32)
    new = model.decoder.generate(prompt, max_new_tokens=6, eos_token_id=glm3.stop_ids)[0, prompt.shape[1]:].tolist()
    new = new[:-1] if new[-1] in glm3.stop_ids else new
    asked = [{"role": "user", "content": QUERY}]
    assert (reply, history) == role_response(glm3, glm3.decode(new, skip_special_tokens=False), asked)
    assert history[0] == asked[0] and history[1]["role"] == "assistant"
    steps = list(model.stream_chat(glm3, QUERY, max_new_tokens=6, do_sample=False))
    assert steps[-1] == (reply, history)
    _, after_tool = model.chat(glm3, '{"ok": 1}', history, role="observation", max_new_tokens=2, do_sample=False)
    assert after_tool[:len(history) + 1] == history + [{"role": "observation", "content": '{"ok": 1}'}]


def test_every_export_of_glm2_ms_is_what_it_names():
    """`from glm2_ms import chat` gave the submodule glm2_ms.chat once that was imported (the import system sets
    the attribute, and the package's lazy __getattr__ is never asked): no submodule may be named like an export."""
    assert not {m.name for m in pkgutil.iter_modules(glm2_ms.__path__)} & set(glm2_ms.__all__)
    names: dict = {}
    exec(f"from glm2_ms import {', '.join(glm2_ms.__all__)}", names)
    assert not [n for n in glm2_ms.__all__ if inspect.ismodule(names[n])]
    assert names["chat"] is chat and names["stream_chat"] is stream_chat
