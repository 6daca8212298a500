"""ADGEN preprocessing on real lines: the recipe's ids, masks and lengths; bad lines skipped and counted."""
import numpy as np
import pytest
from conftest import DATA

from glm2_core.errors import UserError
from glm2_ms.data import IGNORE, Lengths, TrainData, eval_example, read_jsonl, train_example
from glm2_ms.tokenizer import GLM2Tokenizer, build_prompt

tok = GLM2Tokenizer()


def test_first_train_line_follows_the_recipe():
    lines = read_jsonl(DATA / "adgen_train_head200.json")
    assert len(lines.pairs) == 200
    content, summary = lines.pairs[0]
    assert content == "类型#裤*版型#宽松*风格#性感*图案#线条*裤型#阔腿裤"
    ids, labels = train_example(tok, content, summary, Lengths())
    assert len(ids) == len(labels) == 64 + 128 + 1
    # [gMASK] sop, then "[Round 1]\n\n问：" … as the original tokenizer encodes it
    assert ids[:12] == [64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211]
    prompt_len = len(tok.encode(build_prompt(content)))
    assert prompt_len == 39
    assert labels[:prompt_len] == [IGNORE] * prompt_len                # no loss on the prompt
    answer = ids[prompt_len:ids.index(tok.eos_id)]
    assert tok.decode(answer) == summary                                # the whole summary fits in 128 tokens
    assert labels[prompt_len:prompt_len + len(answer) + 1] == answer + [tok.eos_id]
    end = prompt_len + len(answer) + 1
    assert ids[end:] == [0] * (193 - end) and labels[end:] == [IGNORE] * (193 - end)


def test_chatglm3_train_line_follows_its_finetune_format():
    """ChatGLM3 (THUDM's finetune demo): [gMASK] sop <|user|> "\n" content <|assistant|>, then the assistant
    message's "\n" + answer and eos, labelled; the prompt is not."""
    glm3 = GLM2Tokenizer(family="chatglm3")
    content, summary = read_jsonl(DATA / "adgen_train_head200.json").pairs[0]
    ids, labels = train_example(glm3, content, summary, Lengths())
    prompt = [64790, 64792, 64795, 30910, 13, *glm3.vocab.encode(content), 64796]
    answer = [30910, 13, *glm3.vocab.encode(summary), glm3.eos_id]
    assert ids[:len(prompt) + len(answer)] == prompt + answer and len(ids) == 64 + 128 + 1
    assert labels[:len(prompt)] == [IGNORE] * len(prompt) and labels[len(prompt):len(prompt) + len(answer)] == answer
    assert set(labels[len(prompt) + len(answer):]) == {IGNORE}
    assert eval_example(glm3, content, summary)[0] == prompt


def test_truncation_to_source_and_target_lengths():
    long_prompt, long_answer = "类型#裤" * 100, "很好看的裤子。" * 100
    ids, labels = train_example(tok, long_prompt, long_answer, Lengths(16, 8))
    assert len(ids) == 25
    assert ids[:2] == [64790, 64792] and labels[:16] == [IGNORE] * 16
    assert ids[16:24] == tok.encode(long_answer, add_special_tokens=False)[:8]
    assert ids[24] == labels[24] == tok.eos_id


def test_lengths_that_disagree_are_refused():
    with pytest.raises(UserError, match="seq_length 192 disagrees"):
        Lengths(64, 128, seq_length=192)
    assert Lengths(64, 128, seq_length=193).total == 193


def test_eval_example_cuts_characters():
    ids, ref = eval_example(tok, "类型#裤" * 100, "好" * 300, 256, 256)
    assert ref == "好" * 255
    assert tok.decode(ids) == build_prompt(("类型#裤" * 100)[:255])


def test_bad_lines_are_skipped_and_counted(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('{"content": "a", "summary": "b"}\n{not json\n{"content": "a"}\n{"content": " ", "summary": "b"}\n'
                 '[1, 2]\n{"content": 3, "summary": "x"}\n\n{"q": "a", "a": "b"}\n', encoding="utf-8")
    lines = read_jsonl(f)
    assert lines.pairs == [("a", "b")]
    assert lines.skipped == {"invalid json": 1, "missing keys": 3, "blank": 2}
    assert read_jsonl(f, "q", "a").pairs == [("a", "b")]


def test_batches_are_seeded_and_resumable():
    data = TrainData(tok, read_jsonl(DATA / "adgen_train_head200.json"), Lengths())
    a = [x[0].tolist() for x in data.batches(8, seed=3, epoch=0)]
    b = [x[0].tolist() for x in data.batches(8, seed=3, epoch=0)]
    c = [x[0].tolist() for x in data.batches(8, seed=3, epoch=1)]
    assert a == b and a != c and len(a) == 25
    assert len(list(data.batches(7, seed=3))) == 28 and len(list(data.batches(7, seed=3, drop_remainder=False))) == 29
    halves = [list(data.batches(4, seed=3, rank=r, world=2)) for r in (0, 1)]
    glued = [np.concatenate([x[0], y[0]]).tolist() for x, y in zip(*halves, strict=True)]
    assert glued == a  # two ranks of 4 = one process of 8
