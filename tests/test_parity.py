"""glm2-parity: passes on every correct conversion, fails (and says where) on a broken one."""
import json
import tempfile
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import LAYOUTS

from converters.checkpoint import open_checkpoint
from converters.convert import convert
from converters.formats.safetensors_io import SafetensorsWriter
from converters.source import Source
from glm2_core.config import GLM2Config
from glm2_core.names import Layout, canonical_shapes
from validation import parity, streamed
from validation.cli import main as parity_cli
from validation.parity import (
    DEFAULT_PROMPTS,
    Thresholds,
    _font_files,
    _glyphs,
    fits_whole,
    legend_labels,
    markdown,
    plot,
    run_parity,
    whole_model_bytes,
)
from validation.references import glm_reference, torch_reference
from validation.streamed import HEAD, LayerWeights, Rows

PROMPTS = ["你好", "Write a short poem about the sea."]


def test_torch_reference_equals_transformers_glm(hf_tiny):
    src = hf_tiny(dtype="float32")
    ours, theirs = torch_reference(src, "float32"), glm_reference(src, "float32")
    ids = [64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 36474, 54591]
    a, b = dict(ours.trace(ids)), dict(theirs.trace(ids))
    assert list(a) == list(b)
    for name in a:
        assert np.abs(a[name] - b[name]).max() <= 1e-5, name
    assert ours.generate(ids, 8) == theirs.generate(ids, 8)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe())
def test_parity_passes_for_every_layout(hf_tiny, tmp_path, layout):
    """Every layout's traces; the greedy tokens, which follow from the logits compared, for the first alone
    (compiling the decoder for a prompt is most of a tiny model's parity run)."""
    src = hf_tiny(dtype="float32")
    convert(src, tmp_path / "ms", target=layout, fmt="ckpt", progress=False)
    report = run_parity(src, tmp_path / "ms", PROMPTS, "float32", new_tokens=8 if layout == LAYOUTS[0] else 0)
    assert report["passed"], json.dumps(report["prompts"][0]["stages"][-1])
    for p in report["prompts"]:
        assert p["logits_max_abs"] <= 1e-4 and p["top1_agreement"] == 1.0 and p["greedy_agreement"] == 1.0
        assert p["first_divergence"] is None


def without_timings(report: dict) -> dict:
    report = json.loads(json.dumps(report))
    del report["load_seconds"], report["mode"]
    for p in report["prompts"]:
        del p["seconds"]
    return report


def test_streamed_report_equals_whole_report(hf_tiny, tmp_path, monkeypatch):
    """Layer by layer (each side's own cells/modules, one block in memory; the embedding on the rows in use, the
    output layer in slices: 16 here), then each whole model's greedy tokens with float16 weights computing in
    float32, each in a process of its own as at 6B: the same numbers as both whole float32 models side by side."""
    monkeypatch.setattr(streamed, "HEAD_BYTES", 4 * 64 * 4096)  # 4,096 of the 65,024 rows at a time
    monkeypatch.setattr(parity, "fits_whole", lambda *_: False)  # the greedy passes apart, as when they would not fit
    apart, spawn = [], parity.greedy_apart
    monkeypatch.setattr(parity, "greedy_apart", lambda side, *args: apart.append(side) or spawn(side, *args))
    src = hf_tiny(dtype="float16")
    convert(src, tmp_path / "ms", target=Layout("mindformers", qkv_split=True), fmt="ckpt", progress=False)
    whole = run_parity(src, tmp_path / "ms", PROMPTS, "float32", new_tokens=8, streamed=False)
    layered = run_parity(src, tmp_path / "ms", PROMPTS, "float32", new_tokens=8, streamed=True)
    assert whole["passed"] and (whole["mode"], layered["mode"]) == ("whole", "streamed")
    assert without_timings(layered) == without_timings(whole)
    assert len(layered["prompts"][0]["stages"]) == 2 * 2 + 2  # every layer's attention and MLP, norm, logits
    assert apart == ["ref", "ms"]


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_streamed_output_layer_is_read_by_rows(hf_tiny, tmp_path, fmt):
    """The output layer is not read whole: its rows come from the file a slice at a time, as the file holds them.
    (A safetensors file whose sha256 our manifest records is read whole, to be checked: here it is one another tool
    wrote, with no such record.)"""
    convert(hf_tiny(dtype="float16"), tmp_path / "ms", target=Layout("mindformers"), fmt=fmt, progress=False)
    if fmt == "safetensors":
        (tmp_path / "ms" / "manifest.json").unlink()
    weights = LayerWeights(tmp_path / "ms", Layout(), "float32")
    try:
        head = weights.read(HEAD)
        output = head["transformer.output_layer.weight"]
        assert isinstance(output, Rows) and (output.count, output.dtype) == (65024, "float16")
        with Source.open(tmp_path / "ms") as src:
            whole = dict((n, a) for n, a, _ in src.stream(src.groups(Layout())[0]))["transformer.output_layer.weight"]
        np.testing.assert_array_equal(output.read(1000, 3000), whole[1000:3000])
        weights.check()
    finally:
        weights.close()


def test_whole_models_are_the_default_when_they_fit(hf_tiny, tmp_path):
    src = hf_tiny(dtype="float32")
    params = sum(int(np.prod(s)) for s in canonical_shapes(GLM2Config.preset("tiny")).values())
    assert whole_model_bytes(src, "float32") == 2 * 4 * params and whole_model_bytes(src, "float16") == 2 * 2 * params
    assert fits_whole(src, "float32")


@pytest.mark.parametrize("mode", ["--whole", "--streamed"])
def test_broken_conversion_fails_at_layer_0_attention(hf_tiny, tmp_path, mode):
    """RoPE rows rearranged, but the manifest says they are not: the runtime loads them as plain rows."""
    src = hf_tiny(dtype="float32")
    convert(src, tmp_path / "ms", target=Layout("mindformers", rearrange_rope=True), fmt="ckpt", progress=False)
    manifest = json.loads((tmp_path / "ms" / "manifest.json").read_text())
    manifest["layout"]["rearrange_rope"] = False
    (tmp_path / "ms" / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(parity_cli, [str(src), str(tmp_path / "ms"), "--max-new-tokens", "0", mode,
                                             "--report", str(tmp_path / "report")])
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert not report["passed"] and report["mode"] == mode[2:]
    assert {p["first_divergence"] for p in report["prompts"]} == {"layer 0 attention"}
    assert "First divergence: **layer 0 attention**" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def fresh_temp_dir(tmp_path, monkeypatch):
    """An empty folder as this process's temp dir, to see what a tool leaves there."""
    (tmp_path / "system-temp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system-temp"))
    return tmp_path / "system-temp"


def test_reference_glm_and_report_files(hf_tiny, tmp_path, fresh_temp_dir):
    """--reference glm streamed: transformers' GLM modules layer by layer, straight from the HF folder in GLM names;
    then its whole model for the greedy tokens, which exports a full model copy to the temp dir (12.5 GB at 6B):
    removed once loaded."""
    src = hf_tiny(dtype="float16")
    convert(src, tmp_path / "ms", target=Layout("mindformers", qkv_split=True), fmt="safetensors", progress=False)
    result = CliRunner().invoke(parity_cli, [str(src), str(tmp_path / "ms"), "--reference", "glm", "--streamed",
                                             "--max-new-tokens", "4", "--report", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "Logits parity: PASS" in result.output and "transformers GlmForCausalLM" in result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert max(s["rel"] for s in report["prompts"][0]["stages"][:-1]) <= 1e-6  # float32 on both sides
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.json", "report.md", "parity.png", "manifest.json"}
    assert list(fresh_temp_dir.iterdir()) == []


def test_reference_glm_export_is_removed_on_failure(hf_tiny, tmp_path, fresh_temp_dir):
    """The export refuses a weight beyond float16's range: the error is one line and the temp dir stays empty."""
    src = hf_tiny("safetensors", "float32")
    big = tmp_path / "big"  # the tiny model with one weight beyond float16's range
    big.mkdir()
    with open_checkpoint(src) as c:
        arrays = {n: (t.read(), t.dtype) for n, t in c.tensors.items()}
    arrays["transformer.output_layer.weight"][0][0, 0] = 1e6
    with open(big / "model.safetensors", "wb") as f:
        w = SafetensorsWriter(f, [(n, a.shape, d) for n, (a, d) in arrays.items()])
        for n, (a, d) in arrays.items():
            w.write(n, a, d)
    (big / "config.json").write_bytes((src / "config.json").read_bytes())
    convert(big, tmp_path / "ms", target=Layout(), fmt="ckpt", dtype="float16", allow_overflow=True, progress=False)
    result = CliRunner().invoke(parity_cli, [str(big), str(tmp_path / "ms"), "--reference", "glm", "--compute-dtype",
                                             "float16"])
    assert result.exit_code == 1 and "overflows float16" in result.output, result.output
    assert list(fresh_temp_dir.iterdir()) == []


def test_remote_code_reference_without_code_is_a_clear_error(hf_tiny, tmp_path):
    src = hf_tiny(dtype="float32")
    convert(src, tmp_path / "ms", target=Layout(), fmt="ckpt", progress=False)
    result = CliRunner().invoke(parity_cli, [str(src), str(tmp_path / "ms"), "--reference", "remote-code"])
    assert result.exit_code == 1 and "no modeling_chatglm.py" in result.output


def test_thresholds_are_overridable():
    th = Thresholds.for_dtype("float16", logits_max_abs=0.5)
    assert th.logits_max_abs == 0.5 and th.top1 == Thresholds.for_dtype("float16").top1



def test_parity_png_legends_have_every_glyph(tmp_path, capfd):
    """The default prompts are mostly Chinese, which matplotlib's own font lacks (they were drawn as boxes, with a
    warning per glyph). Each legend entry is drawn in a font that has its glyphs, or — no such font installed —
    numbered as the prompts are in report.md; no glyph warning either way."""
    numbered = [f"prompt {i}" for i in range(1, 6)]
    default = _font_files()[0]
    assert legend_labels(DEFAULT_PROMPTS, fonts=[]) == (numbered, None)
    assert legend_labels(DEFAULT_PROMPTS, fonts=[default]) == (numbered, None)  # DejaVu Sans has no CJK glyphs
    assert legend_labels(["Write a short poem about the sea."], fonts=[default]) == (["Write a short po"], default)
    labels, font = legend_labels(DEFAULT_PROMPTS)  # whatever this machine has installed
    assert labels == (numbered if font is None else [p[:16] for p in DEFAULT_PROMPTS])
    assert font is None or {ord(c) for label in labels for c in label} <= _glyphs(font)

    stages = [{"stage": s, "rel": 1e-7 * (i + 1), "max_abs": 0.0, "mean_abs": 0.0}
              for i, s in enumerate(["layer 0 attention", "layer 0 mlp", "final norm", "logits"])]
    report = {"prompts": [{"prompt": p, "stages": stages, "tokens": 9, "logits_max_abs": 0.0, "logits_rel": 0.0,
                           "top1_agreement": 1.0, "kl": 0.0, "greedy_agreement": 1.0, "greedy_first_diff": None,
                           "first_divergence": None, "passed": True,
                           "seconds": {"ms_forward": 0.0, "ref_forward": 0.0}} for p in DEFAULT_PROMPTS],
              "thresholds": {"layer_rel": 1e-5, "logits_max_abs": 1e-4, "top1": 1.0, "greedy": 1.0},
              "reference": "torch", "dtype": "float32", "passed": True, "hf_dir": "hf", "ms_dir": "ms", "mode": "whole",
              "model": {"layers": 2, "hidden": 64, "vocab": 65024}, "new_tokens": 8}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot(report, tmp_path / "parity.png")
    assert not [str(w.message) for w in caught if "Glyph" in str(w.message)]
    assert "Glyph" not in capfd.readouterr().err
    assert (tmp_path / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1 | 你好 | 9 |" in markdown(report) and "| 5 | Write a short poem about | 9 |" in markdown(report)


def test_a_gguf_files_blocks_are_held_alike_whole_and_layer_by_layer(hf_tiny, gguf_files, monkeypatch):
    """A q4_0 GGUF file as the MindSpore side, without --quantize: both modes hold the file's blocks, as
    from_pretrained does, and give the same numbers (layer by layer used to read them as floats)."""
    monkeypatch.setattr(streamed, "HEAD_BYTES", 4 * 64 * 4096)
    src = hf_tiny(dtype="float16")
    whole = run_parity(src, gguf_files["q4_0"], PROMPTS, "float32", new_tokens=4, streamed=False)
    layered = run_parity(src, gguf_files["q4_0"], PROMPTS, "float32", new_tokens=4, streamed=True)
    assert without_timings(layered) == without_timings(whole)
    assert all(p["logits_max_abs"] > 1e-4 for p in whole["prompts"])  # q4_0, not the float weights


def test_q8_activations_are_reported_and_alike_whole_and_layer_by_layer(hf_tiny, gguf_files, monkeypatch):
    """--activations q8_0 on a q4_0 file: both modes quantize every product's input alike (the same numbers), the
    numbers are not the float32 activations' numbers, and the report says so; float weights refuse it."""
    monkeypatch.setattr(streamed, "HEAD_BYTES", 4 * 64 * 4096)
    src = hf_tiny(dtype="float16")
    whole = run_parity(src, gguf_files["q4_0"], PROMPTS, "float32", new_tokens=4, streamed=False, activations="q8_0")
    layered = run_parity(src, gguf_files["q4_0"], PROMPTS, "float32", new_tokens=4, streamed=True, activations="q8_0")
    exact = run_parity(src, gguf_files["q4_0"], PROMPTS, "float32", new_tokens=0, streamed=False)
    assert without_timings(layered) == without_timings(whole)
    assert [p["kl"] for p in whole["prompts"]] != [p["kl"] for p in exact["prompts"]]
    assert whole["activations"] == "q8_0" and "their activations in q8_0 blocks" in markdown(whole)
    refused = CliRunner().invoke(parity_cli, [str(src), str(src), "--activations", "q8_0"])
    assert refused.exit_code == 1 and "activations q8_0 go with weights in q8_0/q4_0 blocks" in refused.output


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_a_quantized_model_is_judged_by_top1_and_kl(hf_tiny, tmp_path, monkeypatch, kind):
    """--quantize: MindSpore's weight matrices quantized, against the float reference; layer by layer (quantized
    block by block, the output layer by slices) the same numbers as the whole quantized model; the report gives the
    top-1 agreement and KL and holds no float threshold to it."""
    monkeypatch.setattr(streamed, "HEAD_BYTES", 4 * 64 * 4096)
    src = hf_tiny(dtype="float16")
    convert(src, tmp_path / "ms", target=Layout("mindformers"), fmt="ckpt", progress=False)
    whole = run_parity(src, tmp_path / "ms", PROMPTS, "float32", new_tokens=8, streamed=False, quantize=kind)
    layered = run_parity(src, tmp_path / "ms", PROMPTS, "float32", new_tokens=8, streamed=True, quantize=kind)
    assert without_timings(layered) == without_timings(whole)
    for p in whole["prompts"]:
        assert p["logits_max_abs"] > 1e-4 and p["kl"] > 0
        assert p["top1_agreement"] >= Thresholds.for_quantized(kind).top1
    assert whole["passed"] and whole["quantize"] == kind and whole["thresholds"]["logits_max_abs"] is None
    assert f"quantized to {kind}" in markdown(whole) and "none on the layers and logits" in markdown(whole)
    fast = run_parity(src, tmp_path / "ms", PROMPTS, "float32", new_tokens=8, streamed=False, quantize=kind,
                      activations="q8_0")
    assert fast["passed"] and fast["thresholds"]["top1"] == Thresholds.for_quantized(kind, "q8_0").top1
    assert [p["kl"] for p in fast["prompts"]] != [p["kl"] for p in whole["prompts"]]
    plot(whole, tmp_path / "parity.png")
    refused = CliRunner().invoke(parity_cli, [str(src), str(tmp_path / "ms"), "--quantize", kind,
                                              "--compute-dtype", "float16"])
    assert refused.exit_code == 1 and "quantized weights compute in float32, not float16" in refused.output
