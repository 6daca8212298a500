"""The tokenizers reproduce the originals' ids: ChatGLM2's and ChatGLM3's on the real tokenizer.model, GLM-4's
chat format on a ranks file of its size."""

import shutil

import numpy as np
import pytest
from helpers import glm4_ranks

from glm2_core.errors import CheckpointError
from glm2_ms.tokenizer import DEFAULT_MODEL, GLM2Tokenizer, build_prompt, detect_family


@pytest.fixture(scope="module")
def tok():
    return GLM2Tokenizer()


def test_known_ids(tok):
    assert tok.encode("你好") == [64790, 64792, 36474, 54591]
    assert tok.encode("Hello world", add_special_tokens=False) == [13755, 993]
    assert (tok.special["[MASK]"], tok.special["eop"]) == (64789, 64793)
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (64794, 2, 0)


def test_prompt_format_and_history(tok):
    assert build_prompt("你好") == "[Round 1]\n\n问：你好\n\n答："
    assert build_prompt("再见", [("你好", "你好！")]) == \
        "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：再见\n\n答："
    assert tok.build_chat_input("你好")[:4] == [64790, 64792, 790, 30951]


def test_decode_skips_special_tokens(tok):
    ids = tok.encode("晚上睡不着应该怎么办") + [tok.eos_id]
    assert tok.decode(ids) == "晚上睡不着应该怎么办"
    assert tok.decode(ids, skip_special_tokens=False).startswith("[gMASK]sop")


def test_left_padding_with_positions(tok):
    batch = tok(["你好", "晚上睡不着应该怎么办"])
    short = tok.encode("你好")
    width = batch.input_ids.shape[1]
    assert batch.input_ids[0, -len(short):].tolist() == short
    assert (batch.input_ids[0, :width - len(short)] == 0).all()
    assert batch.attention_mask[0].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert batch.position_ids[0, -len(short):].tolist() == list(range(len(short)))
    assert batch.position_ids[1].tolist() == list(range(width))
    assert tok(["你好"], max_length=3).input_ids.tolist() == [[64790, 64792, 36474]]
    assert np.issubdtype(batch.input_ids.dtype, np.integer)


# --- the GLM family: ChatGLM3 (the same sentencepiece model + role tokens) and GLM-4 (a tiktoken ranks file) ---

GLM3_GREETING = "你好👋！我是人工智能助手 ChatGLM3-6B，很高兴见到你，欢迎问我任何问题。"


@pytest.fixture(scope="module")
def glm3():
    return GLM2Tokenizer(family="chatglm3")


def test_chatglm3_role_tokens_and_published_chat_ids(glm3):
    """The ids chatglm.cpp's tests publish for the real ChatGLM3 tokenizer."""
    assert glm3.encode("你好") == [64790, 64792, 36474, 54591]
    assert [glm3.special[f"<|{r}|>"] for r in ("system", "user", "assistant", "observation")] == \
        [64794, 64795, 64796, 64797]
    assert glm3.build_chat_input("你好") == [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": GLM3_GREETING}]
    assert glm3.build_chat_input("晚上睡不着应该怎么办", history) == [
        64790, 64792, 64795, 30910, 13, 36474, 54591, 64796, 30910, 13, 36474, 54591, 243, 162, 148, 142, 31404,
        33030, 34797, 42481, 22011, 10461, 30944, 30966, 30941, 30978, 30949, 31123, 48895, 35214, 54622, 31123,
        32616, 39905, 31901, 31639, 31155, 64795, 30910, 13, 30910, 32820, 54266, 31876, 35153, 64796]
    assert glm3.stop_ids == (2, 64795, 64797) and glm3.pad_id == 0


def test_chatglm3_system_tools_and_metadata(glm3):
    tools = [{"name": "track", "parameters": {"symbol": "string"}}]
    history = [{"role": "system", "content": "Answer.", "tools": tools},
               {"role": "assistant", "metadata": "track", "content": "x"}]
    ids = glm3.build_chat_input("ok", history, role="observation")
    text = glm3.decode(ids, skip_special_tokens=False)
    assert text.startswith("[gMASK]sop<|system|>\n Answer.\n[\n    {\n        \"name\": \"track\"")
    assert "<|assistant|>track\n x<|observation|>\n ok<|assistant|>" in text
    with pytest.raises(Exception, match="unknown chat role"):
        glm3.build_chat_input("hi", role="robot")


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("glm4")
    glm4_ranks(folder / "tokenizer.model")
    return GLM2Tokenizer.from_pretrained(folder)


def test_glm4_special_tokens_and_published_chat_ids(glm4):
    assert glm4.family.name == "glm4" and glm4.n_words == 151329
    assert [glm4.special[t] for t in ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>")] == \
        [151331, 151333, 151336, 151337]
    assert glm4.stop_ids == (151329, 151336, 151338) and glm4.pad_id == 151329
    assert glm4.build_chat_input("你好") == [151331, 151333, 151336, 198, 109377, 151337]
    assert glm4.encode("你好", add_special_tokens=False) == [109377]
    assert glm4.decode([151331, 151333, 109377, 151329]) == "你好"
    assert glm4.decode(glm4.build_chat_input("你好"), skip_special_tokens=False) == \
        "[gMASK]<sop><|user|>\n你好<|assistant|>"
    assert glm4.batch([[109377], [198, 109377]]).input_ids[0, 0] == 151329  # padded with <|endoftext|>


@pytest.mark.parametrize("text, error", [
    ("IQ== 0\n", "256 single bytes"), ("IQ== 0\nIg== 2\n", "ranks must be 0, 1, 2"),
    ("IQ== 0\nIQ== 1\n", "ranks must be"),
    ("IQ==\n", "line 1 is not"), ("!!! 0\n", "line 1 is not"), ("IQ== 0 7\n", "line 1 is not"),
    ("IQ== x\n", "line 1 is not")])
def test_bad_ranks_files_are_one_line_errors(tmp_path, text, error):
    (tmp_path / "tokenizer.model").write_text(text)
    with pytest.raises(CheckpointError, match=error):
        GLM2Tokenizer(tmp_path, family="glm4")


def test_family_detected_from_the_folder(tmp_path, tok):
    shutil.copy(DEFAULT_MODEL, tmp_path / "tokenizer.model")
    assert detect_family(tmp_path) == "chatglm2"
    assert detect_family(tmp_path, named="chatglm3") == "chatglm3"
    (tmp_path / "config.json").write_text('{"_name_or_path": "THUDM/chatglm3-6b"}')
    assert GLM2Tokenizer.from_pretrained(tmp_path).stop_ids == (2, 64795, 64797)
    assert GLM2Tokenizer.from_pretrained(tmp_path, family="chatglm2").stop_ids == (2,)
