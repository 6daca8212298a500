"""glm2-serve through the official `openai` client (and raw HTTP where the client hides the wire): chat, streaming,
completions, tool calls of ChatGLM3 and GLM-4, every refusal in OpenAI's error shape with the server going on,
a full queue, a client gone mid-stream, SIGTERM; concurrent requests batched yet each equal to itself run alone."""
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from helpers import glm4_ranks, serving
from test_mapped import corrupt

from converters.synth import synthesize
from glm2_core.config import GLM2Config
from glm2_core.errors import UserError
from glm2_core.files import TOKENIZER_MODEL
from glm2_ms.openai_api import ChatRequest, Conversation, Transcript
from glm2_ms.tokenizer import GLM2Tokenizer

ROOT = Path(__file__).resolve().parents[1]
HI = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def model_dir(ms_tiny):
    return ms_tiny("float32")


@pytest.fixture(scope="module")
def server(model_dir):
    with serving(model_dir, "--slots", "4", "--context", "512", "--queue", "16") as (proc, url):
        yield proc, url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def metrics(url: str) -> dict:
    lines = httpx.get(url + "/metrics").text.splitlines()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines)}


def test_chat_is_the_runtime_chat_round(server, model_dir):
    _, _, client = server
    from glm2_ms.api import open_model  # noqa: PLC0415  (MindSpore in this process only for this comparison)
    with open_model(model_dir) as folder:
        tok, model = folder.tokenizer, folder.load()
    for query in ("你好", "写一句关于秋天的诗"):
        reply = client.chat.completions.create(model=model_dir.name, messages=[{"role": "user", "content": query}],
                                               max_tokens=12, temperature=0)
        alone, _ = model.chat(tok, query, max_new_tokens=12, do_sample=False)
        assert reply.choices[0].message.content == alone
        assert reply.usage.prompt_tokens == len(tok.build_chat_input(query)) and reply.usage.completion_tokens == 12
        assert reply.choices[0].finish_reason == "length"


def test_streaming_sends_the_whole_reply_in_chunks_and_ends_with_done(server, model_dir):
    _, url, client = server
    ask = dict(model=model_dir.name, messages=HI, max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage == whole.usage
    assert whole.object == "chat.completion" and {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    with httpx.stream("POST", url + "/v1/chat/completions", json={**ask, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert r.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"


def test_completions_models_and_health(server, model_dir):
    _, url, client = server
    assert [m.id for m in client.models.list()] == [model_dir.name]
    assert client.models.retrieve(model_dir.name).id == model_dir.name
    one = client.completions.create(model=model_dir.name, prompt="从前有座山", max_tokens=6, temperature=0)
    two = client.completions.create(model=model_dir.name, prompt="从前有座山", max_tokens=6, temperature=0,
                                    stream=True)
    two = list(two)
    assert one.choices[0].text == "".join(c.choices[0].text for c in two) and one.usage.completion_tokens == 6
    assert {one.object} | {c.object for c in two} == {"text_completion"} and one.id.startswith("cmpl-")
    sampled = [client.completions.create(model=model_dir.name, prompt="从前", max_tokens=8, seed=7).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed repeats a sampled reply
    assert httpx.get(url + "/health").json()["status"] == "ok"
    logged = [line for line in server[0].lines if line.startswith(f"glm2-serve: {one.id} completion 200 in ")]
    assert logged and " out 6 ttft " in logged[0]  # a request's line: id, status, tokens, time to first token


def test_a_stop_sequence_ends_the_reply_before_it(server, model_dir):
    _, _, client = server
    ask = dict(model=model_dir.name, prompt="从前有座山", max_tokens=12, temperature=0)
    text = client.completions.create(**ask).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(**ask, stop=[stop])
    streamed = "".join(c.choices[0].text for c in client.completions.create(**ask, stop=stop, stream=True))
    assert cut.choices[0].text == streamed == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_share_steps_and_each_equals_itself_alone(server, model_dir):
    _, url, client = server
    asks = [dict(model=model_dir.name, messages=[{"role": "user", "content": "你好" * (1 + 7 * i)}],
                 max_tokens=8 + 5 * i, temperature=0) for i in range(6)]
    alone = [client.chat.completions.create(**a).choices[0].message.content for a in asks]
    before = metrics(url)
    together = [None] * len(asks)

    def ask(i):
        together[i] = client.chat.completions.create(**asks[i]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = metrics(url)
    assert together == alone
    rows = after["glm2_engine_step_rows_total"] - before["glm2_engine_step_rows_total"]
    assert rows / (after["glm2_engine_steps_total"] - before["glm2_engine_steps_total"]) > 1.5  # steps were shared


REFUSALS = [  # (body, or raw bytes; status; the error's param or code)
    (b"{not json", 400, "json_invalid"),
    (b"[1, 2]", 400, None),
    ({"model": None, "messages": HI}, 400, "model"),
    ({"model": "nope", "messages": HI}, 404, "model_not_found"),
    ({"messages": HI, "max_tokens": "5"}, 400, "max_tokens"),
    ({"messages": HI, "temperature": -1}, 400, "temperature"),
    ({"messages": HI, "n": 2}, 400, "n"),
    ({"messages": HI, "frobnicate": True}, 400, "frobnicate"),
    ({"messages": HI, "max_tokens": 600}, 400, "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "你好" * 600}]}, 400, "context_length_exceeded"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, None),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, None),
    ({"messages": HI, "stop": ["a"] * 5}, 400, "stop"),
    ({"messages": HI, "logprobs": True}, 400, "logprobs"),
]


@pytest.mark.parametrize("body,status,which", REFUSALS)
def test_every_refusal_is_openais_error_and_the_server_goes_on(server, model_dir, body, status, which):
    _, url, _ = server
    if isinstance(body, dict):  # the served model unless the body names another (None: no model at all)
        body = {"model": model_dir.name, **body}
        body = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
    r = httpx.post(url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == status and error["message"], r.text
    assert which is None or which in (error["param"], error["code"]), error
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_the_client_sees_refusals_as_its_own_errors(server, model_dir):
    _, url, client = server
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=HI)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=model_dir.name, messages=HI, max_tokens=10**6)
    r = httpx.post(url + "/v1/chat/completions", content=b"x" * (5 * 2**20))
    assert r.status_code == 413 and r.json()["error"]["message"]
    assert httpx.get(url + "/v2/nothing").status_code == 404
    assert httpx.get(url + "/v1/chat/completions").json()["error"]["message"]
    assert any("POST /v1/chat/completions 413" in line for line in server[0].lines)  # refusals are logged too
    counted = metrics(url)
    assert counted['glm2_requests_total{status="413"}'] >= 1 and counted['glm2_requests_total{status="404"}'] >= 1


def test_fuzzed_bodies_end_in_errors_never_in_failures(server, model_dir):
    _, url, _ = server
    rng = np.random.default_rng(0)
    good = json.dumps({"model": model_dir.name, "messages": HI, "max_tokens": 2, "temperature": 0}).encode()
    values = [None, -1, 0, 1.5, 10**30, "", "x" * 300, [], {}, True, [{"role": "user"}], {"a": [1]}]
    keys = ["messages", "max_tokens", "temperature", "top_p", "stop", "seed", "tools", "tool_choice", "stream",
            "model", "n", "content", "role"]
    for _ in range(120):
        if rng.random() < 0.5:  # bytes flipped, cut or repeated
            body = bytearray(good)
            for at in rng.integers(0, len(body), 3):
                body[at] = rng.integers(0, 256)
            body = bytes(body[:rng.integers(1, len(body) + 1)])
        else:  # a field set to a value of another type
            request = json.loads(good)
            request[keys[rng.integers(len(keys))]] = values[rng.integers(len(values))]
            body = json.dumps(request).encode()
        r = httpx.post(url + "/v1/chat/completions", content=body, timeout=60)
        assert r.status_code in (200, 400, 404), r.text
        assert r.status_code == 200 or r.json()["error"]["message"]
    assert httpx.get(url + "/health").json()["status"] == "ok"


@pytest.fixture(scope="module")
def babbler(tmp_path_factory):
    """A model that never stops: every token is followed by token 0 (all its logits are equal), so a long request
    stays in its slot for as long as a test needs."""
    out = tmp_path_factory.mktemp("babbler") / "babbler"
    synthesize(out, GLM2Config.preset("tiny"), "float32", "safetensors", script=scripted([]))
    return out


def test_a_full_queue_is_429_and_a_client_gone_frees_its_slot(babbler):
    model_dir = babbler
    with serving(model_dir, "--slots", "1", "--queue", "1", "--context", "2048") as (_, url):
        ask = {"model": model_dir.name, "messages": HI, "temperature": 0}
        with httpx.stream("POST", url + "/v1/chat/completions", json={**ask, "max_tokens": 2000, "stream": True},
                          timeout=60) as long:
            lines = long.iter_lines()  # (held: a dropped iterator closes the stream)
            next(lines)  # the long request holds the one slot
            waiting = {}
            queued = threading.Thread(target=lambda: waiting.update(
                r=httpx.post(url + "/v1/chat/completions", json={**ask, "max_tokens": 3}, timeout=60)))
            queued.start()
            _wait(lambda: metrics(url)["glm2_queue_waiting"] == 1)
            full = httpx.post(url + "/v1/chat/completions", json={**ask, "max_tokens": 3})
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["type"] == "rate_limit_exceeded"
        queued.join(60)  # the stream closed: its slot goes to the request that waited
        assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == 3
        _wait(lambda: metrics(url)["glm2_slots_busy"] == 0)


def test_sigterm_ends_requests_in_flight_and_exits_0(babbler):
    model_dir = babbler
    with serving(model_dir, "--slots", "2", "--context", "2048", "--shutdown-timeout", "1") as (proc, url):
        ask = {"model": model_dir.name, "messages": HI, "max_tokens": 2000, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=ask, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            clock = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            seen = []
            with contextlib.suppress(httpx.HTTPError):
                seen.extend(lines)
            assert "data: [DONE]" not in seen  # the stream is cut, not finished
            assert proc.wait(30) == 0 and time.monotonic() - clock < 15
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")


def test_a_port_in_use_or_a_missing_model_is_one_line(model_dir, tmp_path):
    tool = Path(sys.executable).parent / "glm2-serve"
    with serving(model_dir, "--slots", "1") as (_, url):
        port = url.rsplit(":", 1)[1]
        r = subprocess.run([tool, model_dir, "--port", port], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: cannot listen")
    r = subprocess.run([tool, tmp_path / "none"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    for args, said in ((["--context", "4096"], "passes the model's context of 2048"),
                       (["--slots", "100000", "--context", "2048"], "lower --context or --slots")):
        r = subprocess.run([tool, model_dir, "--port", "0", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "ready at" not in r.stderr and said in r.stderr.strip().splitlines()[-1]


def served_chat(url: str, name: str, query: str = "你好", tokens: int = 8) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": query}],
                                           max_tokens=tokens, temperature=0)
    return reply.choices[0].message.content


def test_a_gguf_file_served_where_it_lies_a_model_quantized_as_it_loads_and_q8_activations(gguf_files, model_dir):
    from glm2_ms.api import open_model  # noqa: PLC0415  (MindSpore in this process only for this comparison)
    for path, loading in ((gguf_files["q4_0"], {}), (model_dir, {"quantize": "q8_0"}),
                          (gguf_files["q4_0"], {"activations": "q8_0"})):
        args = [x for key, value in loading.items() for x in (f"--{key}", value)]
        with serving(path, "--slots", "2", "--context", "256", *args) as (_, url):
            served = served_chat(url, path.name)
        with open_model(path) as folder:
            alone, _ = folder.load(**loading).chat(folder.tokenizer, "你好", max_new_tokens=8, do_sample=False)
        assert served == alone


def test_a_corrupt_weight_stops_the_server_before_it_listens(gguf_files, tmp_path):
    bad = corrupt(gguf_files["float16"], "blk.1.ffn_up.weight", tmp_path)
    r = subprocess.run([Path(sys.executable).parent / "glm2-serve", bad, "--port", "0"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "ready at" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "blk.1.ffn_up.weight" in r.stderr


def _wait(condition, seconds: float = 30):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


# -- tool calls: tiny models whose weights say what they reply ------------------------------------------------
def scripted(chain: list[int]):
    """Weights of a model that answers each token of `chain` with the next one: the blocks add nothing (their
    output projections are zero), token chain[i] embeds as the i-th unit vector, and the output layer maps that
    vector to chain[i + 1]. The runtime, tokenizer and parsing are the real ones; only the reply is chosen."""
    def values(name, shape):
        if name.endswith("word_embeddings.weight") or name.endswith("output_layer.weight"):
            w = np.zeros(shape, np.float32)
            for i, (a, b) in enumerate(zip(chain, chain[1:], strict=False)):
                w[a if "embeddings" in name else b, i] = 1
            return w
        if name.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
            return np.zeros(shape, np.float32)
        if name.endswith("final_layernorm.weight"):
            return np.ones(shape, np.float32)
        return None
    return values


@pytest.fixture(scope="module")
def tool_models(tmp_path_factory):
    """A GLM-4 model that calls weather({"city": 7}) and a ChatGLM3 model that calls track(…), after any prompt."""
    root = tmp_path_factory.mktemp("tools")
    ranks = glm4_ranks(root / TOKENIZER_MODEL, words=("你好", "weather", '{"', '":', "}"))
    glm4 = GLM2Tokenizer(ranks, "glm4")
    cfg = GLM2Config.preset("tiny", padded_vocab_size=151552, eos_token_id=(151329, 151336, 151338),
                            pad_token_id=151329, release="glm-4-9b-chat")
    chain = [glm4.special["<|assistant|>"], *glm4.vocab.encode('weather\n{"city": 7}'), 151338]
    synthesize(root / "glm4", cfg, "float32", "safetensors", script=scripted(chain))
    (root / "glm4" / TOKENIZER_MODEL).write_bytes(ranks.read_bytes())
    glm3 = GLM2Tokenizer(family="chatglm3")
    chain = [glm3.special["<|assistant|>"], *glm3.vocab.encode("track\ntool_call(x=1)"), 64797]
    synthesize(root / "glm3", GLM2Config.preset("tiny", release="chatglm3-6b"), "float32", "safetensors",
               script=scripted(chain))
    return root


WEATHER = [{"type": "function", "function": {"name": "weather", "description": "天气",
                                             "parameters": {"type": "object", "properties": {"city": {}}}}}]


def test_glm4_tool_calls_come_back_as_tool_calls(tool_models):
    with serving(tool_models / "glm4", "--slots", "2", "--context", "512") as (_, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        ask = dict(model="glm4", messages=[{"role": "user", "content": "北京天气"}], tools=WEATHER, temperature=0)
        reply = client.chat.completions.create(**ask)
        call = reply.choices[0].message.tool_calls[0]
        assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
        assert (call.type, call.function.name, json.loads(call.function.arguments)) == \
            ("function", "weather", {"city": 7})
        chunks = list(client.chat.completions.create(**ask, stream=True))
        streamed = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
        assert streamed[0][0].function.arguments == call.function.arguments
        assert all(not c.choices[0].delta.content for c in chunks) and chunks[-1].choices[0].finish_reason == \
            "tool_calls"
        # the call and its result go back as history: the model's next round runs
        again = client.chat.completions.create(model="glm4", tools=WEATHER, temperature=0, messages=[
            *ask["messages"], {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 3}'}])
        assert again.choices[0].finish_reason in ("tool_calls", "stop", "length")
        named = client.chat.completions.create(**ask, tool_choice={"type": "function",
                                                                   "function": {"name": "weather"}})
        assert named.usage.prompt_tokens > reply.usage.prompt_tokens  # the call begun in the prompt


def test_chatglm3_tool_calls_come_back_as_tool_calls(tool_models):
    with serving(tool_models / "glm3", "--slots", "1", "--context", "512") as (_, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        tools = [{"type": "function", "function": {"name": "track"}}]
        reply = client.chat.completions.create(model="glm3", messages=HI, tools=tools, temperature=0)
        call = reply.choices[0].message.tool_calls[0]
        # not a ```python block: the arguments are handed over as written, never run
        assert (call.function.name, call.function.arguments) == ("track", "tool_call(x=1)")
        plain = client.chat.completions.create(model="glm3", messages=HI, temperature=0, max_tokens=8)
        assert plain.choices[0].message.tool_calls is None  # without tools, the same output is text


# -- the protocol without a server ----------------------------------------------------------------------------
def test_messages_become_the_families_prompts():
    glm2, glm3 = GLM2Tokenizer(), GLM2Tokenizer(family="chatglm3")
    ask = ChatRequest(model="m", messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                                           {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    assert Conversation(glm2, ask).ids == glm2.build_chat_input("S\nc", [("a", "b")])
    assert Conversation(glm3, ask).ids == glm3.build_chat_input("c", [
        {"role": "system", "content": "S"}, {"role": "user", "content": "a"},
        {"role": "assistant", "metadata": "", "content": "b"}])
    tools = ChatRequest(model="m", messages=[{"role": "user", "content": "a"}], tools=WEATHER)
    assert Conversation(glm3, tools).ids == glm3.build_chat_input("a", [
        {"role": "system", "content": "", "tools": [WEATHER[0]["function"]]}])
    back = ChatRequest(model="m", messages=[{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "track", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "content": "r"}])
    assert Conversation(glm3, back).ids == glm3.build_chat_input("r", [
        {"role": "user", "content": "a"},
        {"role": "assistant", "metadata": "track", "content": "```python\ntool_call(x=1)\n```"}], "observation")
    with pytest.raises(UserError, match="alternating"):
        Conversation(glm2, ChatRequest(model="m", messages=[{"role": "user", "content": "a"}] * 2))


def test_a_stop_sequence_is_held_back_until_it_is_known():
    tok = GLM2Tokenizer()
    ids = tok.vocab.encode("one two three")
    t = Transcript(tok, ["two thr"])
    shown = "".join(t.add(i) for i in ids)
    assert shown + t.rest(t.reply()[0]) == "one " and t.stopped
    t = Transcript(tok, ["xyz"])
    assert "".join(t.add(i) for i in ids) + t.rest(t.reply()[0]) == "one two three" and not t.stopped


@pytest.mark.parametrize("weights", ["float32", "q4_0"])
def test_the_load_test_in_small(weights, model_dir, gguf_files):
    """Every good reply equals the same request alone; over q4_0 blocks with q8_0 activations too, whose decoding
    steps batch the streams' rows in the kernel's tiles."""
    args = [model_dir] if weights == "float32" else [gguf_files["q4_0"], "--activations", "q8_0"]
    r = subprocess.run([sys.executable, ROOT / "benchmarks" / "serve_load.py", *args, "--clients", "4",
                        "--requests", "3", "--json"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["mismatches"] == 0 and result["server_errors"] == 0 and result["good"] >= 8
    assert result["refused"] > 0 and result["disconnected"] > 0
