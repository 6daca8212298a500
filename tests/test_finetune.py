"""Finetuning on real ADGEN lines: loss goes down, LoRA touches only its factors, adapters go out and back in
(PEFT on torch and transformers, mindpet), and merging is exact (resume and recomputation: test_training.py)."""
import json
from pathlib import Path

import mindspore as ms  # noqa: TID253
import numpy as np
import pytest
import torch  # noqa: TID253
from click.testing import CliRunner
from conftest import DATA
from helpers import optional

from converters.adapters import read_adapter, write_mindpet
from converters.cli import main as convert_cli
from converters.convert import convert
from converters.formats.ckpt import CkptFile, CkptWriter
from converters.runs import NAME
from converters.shards import merge
from converters.strategy import ParamLayout, strategy_bytes
from glm2_core.errors import UserError
from glm2_core.names import Layout
from glm2_ms.api import from_pretrained
from glm2_ms.data import Lengths, TrainData, answer_windows, read_jsonl
from glm2_ms.finetune_cli import main as finetune_cli
from glm2_ms.fused_adamw import FusedAdamW
from glm2_ms.lora import lora_state
from glm2_ms.tokenizer import GLM2Tokenizer
from glm2_ms.train import Trainer, export, token_loss
from glm2_ms.train_config import TrainConfig
from validation.torch_reference import load_reference, with_peft_adapter

TRAIN = DATA / "adgen_train_head200.json"
IDS = [64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 36474, 54591, 13, 13, 55437, 31211]
SMALL = dict(batch_size=4, max_source_length=32, max_target_length=32, seed=0)


def logits(model, ids=IDS):
    model.set_train(False)
    return model(ms.Tensor([ids], ms.int32)).asnumpy()[0]


@pytest.fixture(scope="module")
def base(hf_tiny):
    return hf_tiny("safetensors", "float32")


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    cfg = TrainConfig.load(None, method="lora", max_steps=12, learning_rate=2e-2, lr_end=1e-3, warmup_steps=2,
                           **SMALL)
    trainer = Trainer(base, TRAIN, out, cfg, progress=False)
    losses = trainer.train()
    paths = export(trainer, merge=True)
    return trainer, losses, paths


def test_lora_loss_decreases_and_only_lora_changes(lora_run, base):
    trainer, losses, _ = lora_run
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
    before = {p.name: p.asnumpy() for p in from_pretrained(base).get_parameters()}
    after = {p.name: p.asnumpy() for p in trainer.model.get_parameters() if "dropout_mask" not in p.name}
    lora = {n for n in after if "mindpet_delta_lora" in n}
    assert len(lora) == 2 * 2  # A and B of query_key_value in both layers
    for name, value in before.items():
        assert value.tobytes() == after[name].tobytes(), name  # frozen base: bit-identical
    assert all(np.abs(after[n]).max() > 0 for n in lora if n.endswith("lora_b"))  # B moved off zero


def test_full_finetune_loss_decreases(base, tmp_path):
    cfg = TrainConfig.load(None, method="full", max_steps=10, learning_rate=2e-3, warmup_steps=1, **SMALL)
    trainer = Trainer(base, TRAIN, tmp_path, cfg, progress=False)
    losses = trainer.train()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    # the export is a converter folder: its manifest lists every tensor, and it loads as the trained model
    model = Path(export(trainer)["model"])
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["layout"]["name"] == "mindformers" and manifest["files"] == ["mindspore_model.ckpt"]
    assert {t["name"] for t in manifest["tensors"]} == {p.name for p in trainer.model.get_parameters()}
    assert (model / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    np.testing.assert_allclose(logits(from_pretrained(model)), logits(trainer.model), atol=1e-6)


def test_merged_model_equals_the_lora_model(lora_run):
    trainer, _, paths = lora_run
    want = logits(trainer.model)
    merged = from_pretrained(paths["merged"])
    assert not [p for p in merged.get_parameters() if "lora" in p.name]
    np.testing.assert_allclose(logits(merged), want, atol=1e-5)


def test_peft_adapter_on_torch_reference_and_transformers_glm(lora_run, base, tmp_path):
    peft = optional("peft")
    import transformers

    trainer, _, paths = lora_run
    want = logits(trainer.model)
    config = json.loads((Path(paths["adapter"]) / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 32 and config["target_modules"] == ["query_key_value"]
    ref = with_peft_adapter(load_reference(base), paths["adapter"])
    with torch.no_grad():
        got = ref(torch.tensor([IDS]))[0][0].numpy()
    assert np.abs(got - want).max() <= 1e-5
    convert(base, tmp_path / "glm", target=Layout("glm"), fmt="safetensors", progress=False)
    glm = transformers.GlmForCausalLM.from_pretrained(tmp_path / "glm", dtype=torch.float32)
    glm = peft.PeftModel.from_pretrained(glm, paths["adapter-glm"]).eval()
    with torch.no_grad():
        got = glm(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(got - want).max() <= 1e-5


def test_adapters_round_trip(lora_run, tmp_path):
    trainer, _, paths = lora_run
    state = lora_state(trainer.model)
    for form in ("adapter", "adapter-glm", "mindpet"):
        adapter = read_adapter(paths[form])
        assert (adapter.rank, adapter.scaling) == (8, 4.0), form
        for module, (a, b) in adapter.deltas.items():
            np.testing.assert_array_equal(a, state[f"{module}.mindpet_delta_lora_a"])
            np.testing.assert_array_equal(b, state[f"{module}.mindpet_delta_lora_b"])
    # an imported PEFT adapter merged into the base computes the LoRA model's logits
    imported = read_adapter(paths["adapter"])
    convert(trainer.model_dir, tmp_path / "merged", target=Layout("mindformers"), fmt="ckpt", adapter=imported,
            progress=False)
    np.testing.assert_allclose(logits(from_pretrained(tmp_path / "merged")), logits(trainer.model), atol=1e-5)
    # and written again as mindpet, it reads back the same
    write_mindpet(imported, tmp_path / "again")
    again = read_adapter(tmp_path / "again" / "adapter.ckpt")
    assert again.deltas.keys() == imported.deltas.keys() and again.alpha == imported.alpha


def test_merge_lora_cli_reads_every_form(lora_run, base, tmp_path):
    trainer, _, paths = lora_run
    want = logits(trainer.model)
    # old mindpet names, no adapter_config.json: alpha must be given
    old = tmp_path / "old" / "lora.ckpt"
    old.parent.mkdir()
    with CkptFile(paths["mindpet"] + "/adapter.ckpt") as f, open(old, "wb") as out:
        w = CkptWriter(out)
        for name, ref in f.tensors.items():
            w.write(name.replace("mindpet_delta", "tk_delta"), ref.read(), ref.dtype)
    run = CliRunner().invoke
    refused = run(convert_cli, ["merge-lora", str(base), str(old), str(tmp_path / "m0")])
    assert refused.exit_code == 1 and "--lora-alpha" in refused.output and not (tmp_path / "m0").exists()
    for i, (adapter, extra) in enumerate([(paths["adapter"], []), (paths["adapter-glm"], []),
                                          (str(old), ["--lora-alpha", "32"])]):
        res = run(convert_cli, ["merge-lora", str(base), adapter, str(tmp_path / f"m{i + 1}"), "--quiet", *extra])
        assert res.exit_code == 0, res.output
        np.testing.assert_allclose(logits(from_pretrained(tmp_path / f"m{i + 1}")), want, atol=1e-5)
    # a LoRA run's trainable-parameters file (the adapter, in MindFormers' layout): its alpha is the run's recorded
    net = trainer.out / "checkpoint_trainable" / "rank_0" / "glm2_rank_0-trainable_params.ckpt"
    res = run(convert_cli, ["merge-lora", str(base), str(net), str(tmp_path / "m4"), "--config",
                            str(base / "config.json"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "alpha=32 (scaling 4)" in res.output
    np.testing.assert_allclose(logits(from_pretrained(tmp_path / "m4")), want, atol=1e-5)
    # … and it is not converted as if it were a plain model
    res = run(convert_cli, ["ms2hf", str(net), str(tmp_path / "h"), "--config", str(base / "config.json")])
    assert res.exit_code == 1 and "holds only LoRA adapters" in res.output and "merge-lora BASE" in res.output


def test_merge_shards_of_a_lora_run_folds_its_adapter_into_its_base(lora_run, base, tmp_path):
    """glm2-merge-shards on our own LoRA run folder, whose saves hold only the adapter: lora_alpha from the
    checkpoint's record, the base model the run recorded; the merged model computes the LoRA model's logits."""
    trainer, _, _ = lora_run
    newest = sorted((trainer.out / "checkpoint" / "rank_0").glob("*.ckpt"), key=lambda p: int(NAME.search(
        p.name).group(3)))[-1]
    with CkptFile(newest) as f:  # one rank: every tensor whole on it
        layouts = {n: ParamLayout((1,), (-1,) * len(t.shape)) for n, t in f.tensors.items() if t.shape}
    (tmp_path / "s.ckpt").write_bytes(strategy_bytes(layouts))
    summary, stats = merge([trainer.out], tmp_path / "s.ckpt", tmp_path / "merged", target=Layout("mindformers"),
                           fmt="ckpt", progress=False)
    assert f"LoRA alpha 32 ({newest.with_suffix('.json')})" in stats.notes
    assert f"base model {base.resolve()} (the run's, {newest.with_suffix('.json')})" in stats.notes
    assert (tmp_path / "merged" / "tokenizer.model").is_file()
    np.testing.assert_allclose(logits(from_pretrained(tmp_path / "merged")), logits(trainer.model), atol=1e-5)


def test_adapter_config_names_the_base_by_its_resolved_path(base, tmp_path, monkeypatch):
    """PEFT loads the base from base_model_name_or_path: a path relative to where finetuning ran is useless."""
    monkeypatch.chdir(base.parent)
    cfg = TrainConfig.load(None, method="lora", max_steps=1, **SMALL)
    paths = export(Trainer(Path(base.name), TRAIN, tmp_path / "run", cfg, progress=False))  # untrained is enough
    for form in ("adapter", "adapter-glm"):
        config = json.loads((Path(paths[form]) / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base.resolve()), form


def test_cli_refuses_disagreeing_lengths_and_writes_logs(base, tmp_path):
    res = CliRunner().invoke(finetune_cli, [str(base), "--train-data", str(TRAIN), "--out",
                                            str(tmp_path / "o"), "--seq-length", "100", "--max-steps", "1"])
    assert res.exit_code == 1 and "seq_length 100 disagrees" in res.output
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: full\nbatch_size: 2\nmax_source_length: 16\nmax_target_length: 16\nlearning_rate: 0.001\n")
    res = CliRunner().invoke(finetune_cli, [str(base), "--train-data", str(TRAIN), "--out", str(tmp_path / "o"),
                                            "--train-config", str(cfg), "--max-steps", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["tokens_per_s"] > 0 and r["rss_mb"] > 0 for r in rows)
    assert (tmp_path / "o" / "model" / "mindspore_model.ckpt").is_file()
    assert json.loads((tmp_path / "o" / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    assert (tmp_path / "o" / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    # a larger --max-steps on resume would rebuild the lr schedule mid-run (the lr jumps up): refused, one line
    log = (tmp_path / "o" / "train_log.jsonl").read_text()
    res = CliRunner().invoke(finetune_cli, [str(base), "--train-data", str(TRAIN), "--out", str(tmp_path / "o"),
                                            "--train-config", str(cfg), "--max-steps", "4", "--resume", "--quiet"])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "the run was scheduled for 2 steps; resuming with 4 would rebuild the learning-rate schedule" in res.output
    assert "resume with --max-steps 2" in res.output
    assert (tmp_path / "o" / "train_log.jsonl").read_text() == log


def test_float16_compute_with_dynamic_loss_scaling(base, tmp_path):
    """fp16 compute: a scale of 2^30 overflows the fp16 gradients, so the step is skipped and the scale drops (by 64
    here) until the gradients are finite; training then proceeds with finite losses."""
    cfg = TrainConfig.load(None, method="lora", max_steps=6, learning_rate=1e-2, compute_dtype="float16",
                           loss_scale=2.0 ** 30, loss_scale_factor=64.0, loss_scale_window=2, lora_dropout=0.0,
                           **SMALL)
    trainer = Trainer(base, TRAIN, tmp_path, cfg, progress=False)
    before = lora_state(trainer.model)
    losses = trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    scales = [r["loss_scale"] for r in rows]
    assert all(np.isfinite(losses)) and scales[0] == 2.0 ** 24 and min(scales) >= 1.0
    after = lora_state(trainer.model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # some step was applied


def test_loss_on_answer_windows_equals_the_whole_sequence_loss(base):
    """The trainer computes logits only where the next token is a label; on real lines (long prompts, short
    answers, answers cut at the limit) that gives MindSpore's own cross entropy over the whole sequence."""
    model = from_pretrained(base, dtype="float32")
    model.set_train(False)
    data = TrainData(GLM2Tokenizer(), read_jsonl(TRAIN), Lengths(24, 16))
    ids, labels = data.input_ids[:6], data.labels[:6]
    picks, targets = answer_windows(labels, 17)
    assert picks.shape == targets.shape == (6 * 17,)
    assert sorted(targets[targets != -100]) == sorted(labels[:, 1:][labels[:, 1:] != -100])
    full = model(ms.Tensor(ids)).asnumpy()
    whole = ms.ops.cross_entropy(ms.Tensor(full[:, :-1].reshape(-1, full.shape[-1])),
                                 ms.Tensor(labels[:, 1:].reshape(-1)), ignore_index=-100).asnumpy()
    windowed = token_loss(model(ms.Tensor(ids), picks=ms.Tensor(picks)), ms.Tensor(targets)).asnumpy()
    assert abs(float(windowed) - float(whole)) <= 1e-5 * abs(float(whole))


def test_answer_windows_refuse_labels_wider_than_the_window():
    labels = np.full((1, 10), -100, np.int32)
    labels[0, 2:8] = 5
    picks, targets = answer_windows(labels, 6)
    assert list(picks) == [1, 2, 3, 4, 5, 6] and list(targets) == [5] * 6
    with pytest.raises(UserError, match="span more than 5"):
        answer_windows(labels, 5)


def test_fused_adamw_is_adamw_with_bias_correction():
    """The fused optimizer against AdamW written out in float64 (two groups: decayed and not), and against
    mindspore.experimental.optim.AdamW on the same gradients."""
    from mindspore import Parameter
    from mindspore.experimental.optim import AdamW

    rng = np.random.default_rng(0)
    shapes, decays = [(64, 32), (32,)], [0.1, 0.0]
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(4)]
    lr, b1, b2, eps = 1e-2, 0.9, 0.95, 1e-8
    results = {}
    for cls in (FusedAdamW, AdamW):
        params = [Parameter(ms.Tensor(a.copy()), f"p{i}") for i, a in enumerate(start)]
        opt = cls([{"params": [p], "weight_decay": d} for p, d in zip(params, decays, strict=True)], lr=lr,
                  betas=(b1, b2), eps=eps)
        for g in grads:
            ms.jit(opt.construct)(tuple(ms.Tensor(x) for x in g))
        results[cls.__name__] = [p.asnumpy() for p in params]
    for i, d in enumerate(decays):
        p, m, v = start[i].astype(np.float64), 0.0, 0.0
        for t, g in enumerate(grads, 1):
            m, v = b1 * m + (1 - b1) * g[i], b2 * v + (1 - b2) * g[i] ** 2
            p = p * (1 - lr * d) - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        assert np.abs(results["FusedAdamW"][i] - p).max() < 2e-6
        assert np.abs(results["FusedAdamW"][i] - results["AdamW"][i]).max() < 4e-6


def test_full_finetune_with_the_fused_optimizer_matches_adamw(base, tmp_path):
    """The fused optimizer (the default) against MindSpore's experimental AdamW class (--optimizer adamw)."""
    assert TrainConfig().optimizer == "fused-adamw"
    runs = {}
    for name in ("adamw", "fused-adamw"):
        cfg = TrainConfig.load(None, method="full", max_steps=4, learning_rate=1e-3, optimizer=name, **SMALL)
        trainer = Trainer(base, TRAIN, tmp_path / name, cfg, progress=False)
        runs[name] = (trainer.train(), {p.name: p.asnumpy() for p in trainer.model.trainable_params()})
    (a_losses, a_weights), (f_losses, f_weights) = runs["adamw"], runs["fused-adamw"]
    assert np.allclose(f_losses, a_losses, rtol=1e-5, atol=0)
    assert max(np.abs(f_weights[n] - a_weights[n]).max() for n in a_weights) < 1e-5


def test_lora_keeps_a_float16_base_in_float16_with_the_losses_of_float32(hf_tiny, tmp_path):
    """LoRA on a float16 checkpoint: the frozen base stays float16 in memory (cast to float32 where used, which is
    exact), with the losses of the same run on a float32 copy of it."""
    base16 = hf_tiny("safetensors", "float16")
    cfg = TrainConfig.load(None, method="lora", max_steps=3, learning_rate=1e-2, **SMALL)
    kept = Trainer(base16, TRAIN, tmp_path / "kept", cfg, progress=False)
    assert kept.model.transformer.output_layer.weight.dtype == ms.float16
    widened = Trainer(base16, TRAIN, tmp_path / "f32", cfg, progress=False,
                      model=from_pretrained(base16, dtype="float32"))
    assert kept.train() == widened.train()
