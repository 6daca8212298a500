"""The tokenizer reproduces the original ChatGLM2 tokenizer's ids on the real tokenizer.model."""
import numpy as np
import pytest

from glm2_ms.tokenizer import GLM2Tokenizer, build_prompt


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
