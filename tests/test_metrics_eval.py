"""ADGEN metrics equal the libraries computed by hand; evaluation resumes; MindSpore and torch score the same."""
import json

import pytest
from helpers import optional

jieba = optional("jieba")
optional("rouge_chinese")
optional("nltk")

from click.testing import CliRunner  # noqa: E402
from conftest import DATA  # noqa: E402
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu  # noqa: E402, TID253
from rouge_chinese import Rouge  # noqa: E402, TID253

from converters.convert import convert  # noqa: E402
from glm2_core.names import Layout  # noqa: E402
from validation import CACHE  # noqa: E402
from validation.eval_cli import main as eval_cli  # noqa: E402
from validation.metrics import adgen_scores, sample_scores  # noqa: E402

jieba.dt.tmp_dir = str(CACHE)  # as validation/metrics.py sets it: jieba's cache stays out of the temp dir


def real_pairs():
    rows = [json.loads(line) for line in (DATA / "adgen_dev.json").read_text().splitlines()[:12]]
    refs = [r["summary"] for r in rows]
    preds = [refs[0], refs[1][: len(refs[1]) // 2], refs[3], refs[2][::-1], "这款连衣裙很好看。", "",
             "   ", refs[7] + "<UNK>", refs[8].replace("的", "得"), refs[9][5:], refs[10], "Hello world"]
    return preds, refs


def by_hand(pred, ref):
    hyp, r = " ".join(jieba.cut(pred)), " ".join(jieba.cut(ref))
    s = {k: round(v["f"] * 100, 4) for k, v in Rouge().get_scores(hyp, r)[0].items()}
    s["bleu-4"] = round(sentence_bleu([list(ref)], list(pred), smoothing_function=SmoothingFunction().method3) * 100, 4)
    return s


def test_scores_equal_the_libraries_by_hand_for_both_variants():
    preds, refs = real_pairs()
    blank = {i for i, p in enumerate(preds) if not p.strip()}
    manual = [by_hand(p, r) if i not in blank else dict.fromkeys(("rouge-1", "rouge-2", "rouge-l", "bleu-4"), 0.0)
              for i, (p, r) in enumerate(zip(preds, refs, strict=True))]
    for variant, rows in (("thudm", manual), ("mindformers", [m for i, m in enumerate(manual) if i not in blank])):
        got = adgen_scores(preds, refs, variant)
        for metric in got:
            assert got[metric] == pytest.approx(sum(r[metric] for r in rows) / len(rows), abs=1e-9), (variant, metric)
    assert adgen_scores(preds, refs, "thudm")["bleu-4"] < adgen_scores(preds, refs, "mindformers")["bleu-4"]


def test_edge_cases():
    text = "简约而不简单的牛仔外套，白色的衣身十分百搭。"
    same = sample_scores(text, text)
    assert same["rouge-1"] == pytest.approx(100.0, abs=1e-4) and same["bleu-4"] == pytest.approx(100.0)
    assert sample_scores("", text) == sample_scores(" \n", text) == sample_scores(text, "") == \
        {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    unk = sample_scores(text + "<UNK>", text + "<UNK>")  # 300 dev lines carry a literal <UNK>
    assert unk["rouge-1"] == pytest.approx(100.0, abs=1e-4)
    assert adgen_scores([""], [text], "mindformers") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0,
                                                          "bleu-4": 0.0}


def test_score_cli(tmp_path):
    preds, refs = real_pairs()
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"prediction": p, "reference": r}, ensure_ascii=False)
                           for p, r in zip(preds, refs, strict=True)), encoding="utf-8")
    res = CliRunner().invoke(eval_cli, ["score", str(f), "--variant", "mindformers"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == pytest.approx(adgen_scores(preds, refs, "mindformers"))


def test_eval_resumes_and_metric_parity_passes(hf_tiny, tmp_path):
    src = hf_tiny(dtype="float32")
    convert(src, tmp_path / "ms", target=Layout("mindformers", qkv_split=True), fmt="ckpt", progress=False)
    common = ["--data", str(DATA / "adgen_dev.json"), "--max-samples", "6", "--batch-size", "3",
              "--max-new-tokens", "6", "--quiet"]
    out = tmp_path / "eval"
    first = CliRunner().invoke(eval_cli, [str(tmp_path / "ms"), *common, "--out", str(out)])
    assert first.exit_code == 0, first.output
    lines = (out / "predictions.jsonl").read_text().splitlines()
    whole = (out / "metrics.json").read_text()
    assert len(lines) == 6 and json.loads(whole)["samples"] == 6
    refused = CliRunner().invoke(eval_cli, [str(tmp_path / "ms"), *common, "--out", str(out)])
    assert refused.exit_code == 1 and "--resume" in refused.output
    (out / "predictions.jsonl").write_text("\n".join(lines[:3]) + "\n")  # as if interrupted after one batch
    (out / "metrics.json").unlink()
    again = CliRunner().invoke(eval_cli, [str(tmp_path / "ms"), *common, "--out", str(out), "--resume"])
    assert again.exit_code == 0, again.output
    assert (out / "predictions.jsonl").read_text().splitlines() == lines
    assert (out / "metrics.json").read_text() == whole

    # another model, or other generation settings, are another run: resuming them is refused, one line, nothing
    # written (the predictions of the first model would be reported under the second's name)
    convert(src, tmp_path / "other", target=Layout("mindformers"), fmt="ckpt", progress=False)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["model"] == str((tmp_path / "ms").resolve()) and settings["max_new_tokens"] == 6
    for model, extra, what in ((tmp_path / "other", [], f"model {str((tmp_path / 'ms').resolve())!r}"),
                               (tmp_path / "ms", ["--max-new-tokens", "7"], "max_new_tokens 6")):
        args = [str(model), *common, *extra, "--out", str(out), "--resume"]
        refused = CliRunner().invoke(eval_cli, args)
        assert refused.exit_code == 1 and refused.output.count("\n") == 1, refused.output
        assert f"the predictions there are of {what}" in refused.output
        assert (out / "predictions.jsonl").read_text().splitlines() == lines

    # a model that does not load leaves no --out folder behind
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "mindspore_model.ckpt").write_bytes(b"\x0a\x05trunc")
    failed = CliRunner().invoke(eval_cli, [str(tmp_path / "broken"), *common, "--out", str(tmp_path / "nothing")])
    assert failed.exit_code == 1 and failed.output.startswith("error: "), failed.output
    assert not (tmp_path / "nothing").exists()

    res = CliRunner().invoke(eval_cli, ["--parity", str(src), str(tmp_path / "ms"), *common,
                                        "--out", str(tmp_path / "par")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "par" / "parity.json").read_text())
    assert report["agreement"] == 1.0 and all(v == 0 for v in report["difference"].values())
    assert "ADGEN metric parity: PASS" in (tmp_path / "par" / "parity.md").read_text()


def test_eval_records_q8_activations_and_resumes_only_the_same_arithmetic(gguf_files, hf_tiny, tmp_path):
    """--activations q8_0 is a setting of the predictions: recorded, and a resume with other activations is refused
    (one line, nothing written); a settings.json from before the flag resumes at its default; float weights refuse
    it before any --out is made."""
    model = str(gguf_files["q4_0"])
    common = ["--data", str(DATA / "adgen_dev.json"), "--max-samples", "4", "--batch-size", "2",
              "--max-new-tokens", "4", "--quiet"]
    out = tmp_path / "q8"
    first = CliRunner().invoke(eval_cli, [model, *common, "--activations", "q8_0", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert json.loads((out / "settings.json").read_text())["activations"] == "q8_0"
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n")
    (out / "metrics.json").unlink()
    refused = CliRunner().invoke(eval_cli, [model, *common, "--out", str(out), "--resume"])
    assert refused.exit_code == 1 and refused.output.count("\n") == 1, refused.output
    assert "the predictions there are of activations 'q8_0', this run's is 'float32'" in refused.output
    assert (out / "predictions.jsonl").read_text().splitlines() == lines[:2]
    again = CliRunner().invoke(eval_cli, [model, *common, "--activations", "q8_0", "--out", str(out), "--resume"])
    assert again.exit_code == 0, again.output
    assert (out / "predictions.jsonl").read_text().splitlines() == lines

    plain = tmp_path / "plain"
    assert CliRunner().invoke(eval_cli, [model, *common, "--out", str(plain)]).exit_code == 0
    recorded = json.loads((plain / "settings.json").read_text())
    del recorded["activations"]  # as a run from before the flag recorded it
    (plain / "settings.json").write_text(json.dumps(recorded))
    (plain / "metrics.json").unlink()
    assert CliRunner().invoke(eval_cli, [model, *common, "--out", str(plain), "--resume"]).exit_code == 0
    assert CliRunner().invoke(eval_cli, [model, *common, "--activations", "q8_0", "--out", str(plain),
                                         "--resume"]).exit_code == 1

    floats = CliRunner().invoke(eval_cli, [str(hf_tiny(dtype="float16")), *common, "--activations", "q8_0",
                                           "--out", str(tmp_path / "none")])
    assert floats.exit_code == 1 and "activations q8_0 go with weights in q8_0/q4_0 blocks" in floats.output
    assert not (tmp_path / "none").exists()
