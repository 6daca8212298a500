"""The GLM family through one toolkit: ChatGLM3 and GLM-4 are config presets (with their tokenizers, tested in
test_tokenizer.py), read from and written to config.json, converted and run by the same code as ChatGLM2."""
import json
import math

import numpy as np
import pytest
import yaml
from helpers import glm4_ranks
from numpy_glm2 import NumpyGLM2

from converters.checkpoint import open_checkpoint
from converters.convert import convert
from converters.model_folder import tokenizer_model, tokenizer_or_bundled
from converters.synth import synthesize
from glm2_core.config import GLM2Config
from glm2_core.dtypes import to_float32
from glm2_core.errors import CheckpointError, UserError
from glm2_core.files import TOKENIZER_MODEL
from glm2_core.names import Layout, canonical_shapes
from glm2_ms.api import from_pretrained
from glm2_ms.dialogue import role_response
from glm2_ms.tokenizer import GLM2Tokenizer

IDS = [151331, 151333, 151336, 198, 109377, 151337, 64790, 13]


def test_presets_are_the_releases():
    glm3, glm4 = GLM2Config.preset("chatglm3-6b"), GLM2Config.preset("glm4-9b")
    assert glm3.family == "chatglm3" and canonical_shapes(glm3) == canonical_shapes(GLM2Config.preset("6b"))
    assert (glm4.num_layers, glm4.padded_vocab_size, glm4.rope_theta, glm4.family) == (40, 151552, 5e6, "glm4")
    assert round(sum(map(math.prod, canonical_shapes(glm4).values())) / 1e9, 2) == 9.40  # GLM-4-9B




def test_configs_keep_family_and_eos_lists(tmp_path):
    glm4 = GLM2Config.preset("glm4-9b")
    for written in (glm4.chatglm_json(), glm4.glm_json()):
        assert written["_name_or_path"] == "THUDM/glm-4-9b-chat"
        assert GLM2Config.from_mapping(json.loads(json.dumps(written))) == glm4
    real_like = {**GLM2Config.preset("6b").chatglm_json(), "_name_or_path": "THUDM/chatglm3-6b", "seq_length": 8192}
    assert GLM2Config.from_mapping(real_like) == GLM2Config.preset("chatglm3-6b")


@pytest.mark.parametrize("eos", [[], [1, "2"], list(range(1, 18)), [1.5], [-1]])
def test_bad_eos_lists_are_refused(eos):
    with pytest.raises(CheckpointError, match="eos_token_id must be an integer"):
        GLM2Config.from_mapping({**GLM2Config.preset("6b").chatglm_json(), "eos_token_id": eos})


@pytest.fixture(scope="module")
def glm4_tiny(tmp_path_factory):
    """GLM-4's vocabulary, rope_ratio, epsilon and eos list on the tiny sizes, in float32."""
    cfg = GLM2Config.preset("tiny", padded_vocab_size=151552, rope_ratio=500, layernorm_epsilon=1.5625e-07,
                            eos_token_id=(151329, 151336, 151338), pad_token_id=151329, release="glm-4-9b-chat")
    out = tmp_path_factory.mktemp("glm4") / "hf"
    synthesize(out, cfg, "float32", "safetensors", seed=2)
    return out, cfg


def test_glm4_converts_both_ways_bit_exact(glm4_tiny, tmp_path):
    src, cfg = glm4_tiny
    convert(src, tmp_path / "ms", target=Layout("mindformers"), fmt="ckpt", progress=False)
    convert(tmp_path / "ms", tmp_path / "back", target=Layout("chatglm"), fmt="safetensors",
            progress=False)
    with open_checkpoint(src) as a, open_checkpoint(tmp_path / "back") as b:
        assert set(a.tensors) == set(b.tensors)
        assert all(t.read().tobytes() == b.tensors[n].read().tobytes() for n, t in a.tensors.items())
    assert GLM2Config.from_pretrained(tmp_path / "back") == cfg
    model_config = yaml.safe_load((tmp_path / "ms" / "mindformers_config.yaml").read_text())["model"]["model_config"]
    assert model_config["eos_token_id"] == [151329, 151336, 151338] and model_config["rope_ratio"] == 500


def test_glm4_logits_agree_in_transformers_glm_mindspore_and_an_independent_forward(glm4_tiny, tmp_path):
    """The native GLM-4 form (GlmForCausalLM, rope_theta 5e6) and the MindSpore runtime compute what an independent
    float64 forward computes from the same weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ms = pytest.importorskip("mindspore")

    src, cfg = glm4_tiny
    with open_checkpoint(src) as c:
        weights = {n: to_float32(t.read(), t.dtype) for n, t in c.tensors.items()}
    want = NumpyGLM2(weights, cfg).logits(IDS)
    convert(src, tmp_path / "glm", target=Layout("glm"), fmt="safetensors", progress=False)
    glm = transformers.GlmForCausalLM.from_pretrained(tmp_path / "glm", dtype=torch.float32).eval()
    with torch.no_grad():
        got_glm = glm(torch.tensor([IDS])).logits[0].double().numpy()
    got_ms = from_pretrained(src, dtype="float32")(ms.Tensor([IDS], ms.int32)).asnumpy()[0]
    for got in (got_glm, got_ms):
        assert np.abs(got - want).max() < 1e-5 * max(1.0, np.abs(want).max())
        assert (got.argmax(-1) == want.argmax(-1)).all()


def test_the_bundled_tokenizer_is_only_for_its_families(tmp_path):
    """ChatGLM2's sentencepiece model serves ChatGLM3 too; a GLM-4 folder never gets it."""
    assert tokenizer_or_bundled(tmp_path, "chatglm3")[0][0].name == "tokenizer.model"
    assert tokenizer_or_bundled(tmp_path, "glm4") == ([], True)
    with pytest.raises(UserError, match="glm4's is not bundled"):
        tokenizer_model(tmp_path, "glm4")


def test_role_responses_text_and_tool_calls():
    glm3 = GLM2Tokenizer(family="chatglm3")
    asked = [{"role": "user", "content": "几点了"}]
    reply, history = role_response(glm3, "\n 现在是[[训练时间]]。 ", asked)
    assert reply == "现在是2023年。"
    assert history[-1] == {"role": "assistant", "metadata": "", "content": "现在是[[训练时间]]。"}
    tools = [{"role": "system", "content": "", "tools": [{"name": "track"}]}]
    reply, history = role_response(glm3, "track\n ```python\ntool_call(symbol='10111', n=[1, 2])\n```", tools)
    assert reply == {"name": "track", "parameters": {"symbol": "10111", "n": [1, 2]}} and len(history) == 2
    reply, _ = role_response(glm3, "track\n ```python\ntool_call(__import__('os').system('x'))\n```", tools)
    assert reply["name"] == "track" and "raw" in reply["parameters"]  # read as data, never run
    reply, _ = role_response(glm3, "track\nplain", asked)
    assert reply == {"name": "track", "content": "plain"}


def test_glm4_json_tool_calls(tmp_path):
    glm4_ranks(tmp_path / TOKENIZER_MODEL)
    glm4 = GLM2Tokenizer.from_pretrained(tmp_path)
    tools = [{"role": "system", "content": "", "tools": [{"name": "weather"}]}]
    reply, _ = role_response(glm4, 'weather\n{"city": "北京"}', tools)
    assert reply == {"name": "weather", "parameters": {"city": "北京"}}
    assert role_response(glm4, "\n今年是[[训练时间]]", [])[0] == "今年是2024年"


def test_tools_are_declared_as_each_release_declares_them(tmp_path):
    """ChatGLM3 appends them to the system message as indented JSON (its build_chat_input); GLM-4 gives them a
    system message of their own, each function under its name (its chat template), the system's text after it."""
    tools = [{"name": "weather", "parameters": {"city": "string"}}]
    glm3 = GLM2Tokenizer(family="chatglm3")
    ids = glm3.build_chat_input("你好", [{"role": "system", "content": "S", "tools": tools}])
    assert ids == glm3.prefix() + glm3.message("system", "S\n" + json.dumps(tools, indent=4, ensure_ascii=False)) + \
        glm3.message("user", "你好") + [glm3.special["<|assistant|>"]]
    glm4_ranks(tmp_path / TOKENIZER_MODEL)
    glm4 = GLM2Tokenizer.from_pretrained(tmp_path)
    for declared in (tools, [{"type": "function", "function": tools[0]}]):
        text = glm4.decode(glm4.build_chat_input("你好", [{"role": "system", "content": "S", "tools": declared}]),
                           skip_special_tokens=False)
        assert text.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。")
        assert '# 可用工具\n\n## weather\n\n{\n    "name": "weather",' in text
        assert text.endswith("请使用 Json 格式表示调用的参数。<|system|>\nS<|user|>\n你好<|assistant|>")
