"""Training's exactness: resume reproduces an uninterrupted run, and block-by-block recomputation computes what the
one-graph step computes. (A module of its own beside test_finetune.py: the suite's two workers take a module each.)"""
import json
from dataclasses import replace

import mindspore as ms  # noqa: TID253
import numpy as np
import pytest
from test_finetune import IDS, SMALL, TRAIN

from glm2_ms.api import from_pretrained
from glm2_ms.data import answer_windows
from glm2_ms.lora import LoRAConfig, apply_lora, dropout_masks, size_dropout_masks
from glm2_ms.train import Trainer
from glm2_ms.train_config import TrainConfig
from glm2_ms.train_step import TrainStep, clip_in_place, token_loss


@pytest.fixture(scope="module")
def base(hf_tiny):
    return hf_tiny("safetensors", "float32")


@pytest.mark.parametrize("optimizer", ["adamw", "fused-adamw"])
def test_resume_reproduces_the_uninterrupted_run(base, tmp_path, optimizer):
    cfg = TrainConfig.load(None, method="lora", max_steps=6, learning_rate=2e-2, gradient_accumulation_steps=2,
                           save_steps=2, optimizer=optimizer, **SMALL)
    whole = Trainer(base, TRAIN, tmp_path / "a", cfg, progress=False).train()
    Trainer(base, TRAIN, tmp_path / "b", cfg, progress=False).train(stop_after=3)
    for kind in ("checkpoint", "checkpoint_network"):  # killed after logging step 3, before its checkpoint …
        for f in (tmp_path / "b" / kind / "rank_0").glob("glm2_rank_0-0_3.*"):
            f.unlink()
    with open(tmp_path / "b" / "train_log.jsonl", "a") as log:  # … while writing step 4's row
        log.write('{"step": 4, "epoch": 0, "lo')
    resumed = Trainer(base, TRAIN, tmp_path / "b", cfg, progress=False, resume=True).train()
    assert len(whole) == len(resumed) == 6
    np.testing.assert_allclose(resumed, whole, rtol=1e-6)
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # step 3 of the killed run is gone, trained again
    np.testing.assert_allclose([r["loss"] for r in log], whole, rtol=1e-6)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoint" / "rank_0").glob("*.ckpt")) == \
        ["glm2_rank_0-0_2.ckpt", "glm2_rank_0-0_4.ckpt", "glm2_rank_0-0_6.ckpt"]
    saved = ms.load_checkpoint(str(tmp_path / "a" / "checkpoint" / "rank_0" / "glm2_rank_0-0_6.ckpt"))
    assert int(saved["global_step"].asnumpy()) == 6
    assert any(n.startswith("adam_m.") and n.endswith("mindpet_delta_lora_a") for n in saved)


def _backward_of(base, method: str, recompute: bool):
    """One micro-batch's loss and gradients (by name) from the train step's backward: block by block (recompute)
    or one graph, on a fresh model (LoRA: dropout masks drawn from a fixed generator)."""
    labels = np.full((2, 12), -100, np.int32)
    labels[:, 6:11] = [[31, 32, 33, 34, 2], [41, 42, 43, 2, 2]]
    picks, targets = (ms.Tensor(a) for a in answer_windows(labels, 6))
    ids = np.array([IDS[:12], IDS[6:]], np.int32)
    model = from_pretrained(base)
    masks = []
    if method == "lora":
        apply_lora(model, LoRAConfig(dropout=0.2))
        size_dropout_masks(model, *ids.shape)
        masks = dropout_masks(model, np.random.default_rng(0), *ids.shape, 0.2)
    model.set_train(True)
    step = TrainStep(model, TrainConfig(method=method, recompute=recompute))
    backward = step.backward if recompute else ms.jit(step.backward)  # the one graph's backward is graph code
    loss, grads = backward(ms.Tensor(ids), picks, targets, ms.Tensor(1.0, ms.float32), tuple(masks))
    return float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(step.weights, grads, strict=True)}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_recomputation_gives_the_same_losses_and_gradients(base, tmp_path, method):
    """Block-by-block training (--recompute, the default) computes what the one-graph step computes: the same
    loss and gradients of every trained weight, and the same losses over optimizer steps. (The first block's
    backward pass takes back the matmul outputs its forward pass kept, while the worker's slots hold the last
    block's; full: the matmuls' weight gradients come from those kept outputs' Replay.)"""
    (loss, grads), (loss_rc, grads_rc) = (_backward_of(base, method, rc) for rc in (False, True))
    assert loss_rc == pytest.approx(loss, rel=1e-6) and grads_rc.keys() == grads.keys()
    assert len(grads) == (4 if method == "lora" else 17)  # LoRA: A and B in 2 blocks; full: every weight
    for name, g in grads.items():
        np.testing.assert_allclose(grads_rc[name], g, rtol=1e-5, atol=1e-7, err_msg=name)
    if method == "full":  # the update after it: clipping one gradient at a time equals clipping in the graph
        cfg = TrainConfig.load(None, method=method, max_steps=2, learning_rate=1e-2, **SMALL)
        runs = [Trainer(base, TRAIN, tmp_path / str(rc), replace(cfg, recompute=rc), progress=False).train()
                for rc in (False, True)]
        np.testing.assert_allclose(runs[1], runs[0], rtol=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 1e3])
def test_eager_clipping_is_clip_by_global_norm(max_norm):
    """The block-by-block step clips one gradient at a time, eagerly, with the primitives (Mul, RealDiv: Tensor
    `/` holds several operand-sized buffers on CPU): every value is ops.clip_by_global_norm's within float32
    rounding, and float64's clipping's; below max_norm, the gradients themselves, bit for bit."""
    rng = np.random.default_rng(0)
    grads = [ms.Tensor(rng.standard_normal(shape).astype(np.float32) * 0.1) for shape in [(37, 5), (11,), (3, 4, 2)]]
    expected = ms.ops.clip_by_global_norm(tuple(grads), max_norm)
    norm = np.sqrt(sum((g.asnumpy().astype(np.float64) ** 2).sum() for g in grads))
    clipped = clip_in_place(list(grads), max_norm)
    for e, g, x in zip(expected, clipped, grads, strict=True):
        np.testing.assert_allclose(g.asnumpy(), e.asnumpy(), rtol=1e-6)
        np.testing.assert_allclose(g.asnumpy(), x.asnumpy() * max_norm / max(norm, max_norm), rtol=1e-6)
        if norm <= max_norm:
            np.testing.assert_array_equal(g.asnumpy(), x.asnumpy())


def test_token_loss_and_its_gradient_are_cross_entropys():
    """The training loss (on the fused LogSoftmax) and its automatic gradient against cross entropy and its
    gradient (softmax − one-hot, each row weighted by its share of the mean) in float64, with ignored targets."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((9, 50)) * 4).astype(np.float32)
    targets = rng.integers(0, 50, 9).astype(np.int32)
    targets[[1, 5]] = -100
    x = logits.astype(np.float64)
    logp = x - x.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    keep = targets != -100
    expected = -logp[keep, targets[keep]].mean()
    grad = np.exp(logp)
    grad[keep, targets[keep]] -= 1
    grad *= keep[:, None] / keep.sum()
    loss, got = ms.value_and_grad(token_loss)(ms.Tensor(logits), ms.Tensor(targets))
    assert float(loss.asnumpy()) == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(got.asnumpy(), grad, rtol=1e-5, atol=1e-7)
