"""`glm2-demo`: the main job on an embedded default — no download, about a minute on 2 cores.

Synthesizes a small ChatGLM2 checkpoint with the real tokenizer and the release's layout, converts it
HF → MindSpore → HF and proves the round trip bit-exact, generates from the converted checkpoint with the
MindSpore runtime, LoRA-finetunes it on real ADGEN lines, and ends with a logits-parity verdict between the
MindSpore runtime and the PyTorch reference.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from converters.convert import convert
from converters.inspect_verify import verify
from converters.output import staged_folder
from converters.synth import synthesize
from glm2_core.config import GLM2Config
from glm2_core.names import Layout
from glm2_core.options import PATH, Tool, option
from glm2_core.outputs import check_output, stamp
from glm2_ms.api import from_pretrained
from glm2_ms.dialogue import chat
from glm2_ms.generation import Decoder
from glm2_ms.loading import use_cpu
from glm2_ms.tokenizer import GLM2Tokenizer
from glm2_ms.train import Trainer, export
from glm2_ms.train_config import TrainConfig

from .evaluate import EvalRequest, EvalSettings, metric_parity
from .parity import DEFAULT_PROMPTS, run_parity

ASSETS = Path(__file__).resolve().parent / "assets"
ADGEN_LINES = ASSETS / "adgen_train_head200.json"
ADGEN_DEV = ASSETS / "adgen_dev_head20.json"
DEMO = "demo workdir"  # what our manifest.json calls a --workdir folder


@click.command("glm2-demo", cls=Tool)
@click.option("--workdir", type=PATH, show_default="a temporary folder, removed at the end",
              help="Write the outputs into this new folder and keep them.")
@option("--overwrite")
def main(workdir: Path | None, overwrite: bool):
    """The main job on a small generated checkpoint, no download (about a minute on 2 cores): synthesize a tiny
    ChatGLM2 (real tokenizer, the release's sharded layout), convert it HF → MindSpore → HF and verify the round
    trip bit-exact, generate with the MindSpore runtime, LoRA-finetune on real ADGEN lines, and check logits and
    ADGEN-metric parity against the PyTorch reference. Exit 1 when a check fails."""
    if workdir:
        sys.exit(_kept(Path(workdir), overwrite))
    with tempfile.TemporaryDirectory(prefix="glm2-demo-") as root:  # its outputs: removed, also on failure
        code = _run(Path(root), None)
    sys.exit(code)


def _kept(workdir: Path, overwrite: bool) -> int:
    """The demo with its outputs in the new folder `workdir`, which appears only when every step has run (a step
    that fails with an error leaves nothing); an existing one is refused, or replaced with --overwrite when this
    toolkit wrote it, as every tool's output (`glm2_core.outputs`)."""
    check_output(workdir, overwrite, (ASSETS,), "--workdir", kind=DEMO)
    with staged_folder(workdir, overwrite, (ASSETS,), kind=DEMO) as root:
        code = _run(root, workdir)
        stamp(root, DEMO)
    return code


def _run(root: Path, kept: Path | None) -> int:
    """The demo's steps with their outputs under `root` (named relative to it: it may be a staging folder that
    becomes `kept`); the exit status."""
    hf, ms_dir, back = root / "hf-tiny", root / "ms-tiny", root / "hf-roundtrip"
    cfg = GLM2Config.preset("tiny")
    files = synthesize(hf, cfg, "float32", "bin", seed=0, max_shard_bytes=10 * 10**6, overwrite=True)
    click.echo(f"1. synthesized {hf.name}: {len(files)} .bin shards + index, config.json, tokenizer "
               f"({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.padded_vocab_size}, float32)")
    s1 = convert(hf, ms_dir, target=Layout("mindformers"), fmt="ckpt", overwrite=True, progress=False)
    click.echo("2. hf2ms  " + "\n   ".join(s1.lines()))
    s2 = convert(ms_dir, back, target=Layout("chatglm"), fmt="safetensors", overwrite=True,
                 progress=False)
    click.echo("3. ms2hf  " + "\n   ".join(s2.lines()))
    report = verify(hf, back)
    exact = sum(r["bit_exact"] for r in report["tensors"])
    click.echo(f"4. verify: {exact}/{report['compared']} tensors bit-exact after the round trip")
    click.echo(f"5. MindSpore runtime, greedy, 8 new tokens after the chat prompt for 你好 (random weights, so the "
               f"text is noise): {_generate(ms_dir)!r}")
    first, last, adapter = _finetune(ms_dir, root / "lora")
    click.echo(f"6. LoRA finetune (r 8, alpha 32) on 200 real ADGEN lines, 8 steps: loss {first:.3f} -> {last:.3f}; "
               f"PEFT adapter in {Path(adapter).relative_to(root)}")
    parity = _parity(hf, ms_dir)
    worst = max(p["logits_max_abs"] for p in parity["prompts"])
    click.echo(f"7. logits parity, MindSpore vs PyTorch reference, float32, {len(parity['prompts'])} prompts: "
               f"max |Δlogits| {worst:.2e}, greedy agreement "
               f"{min(p['greedy_agreement'] for p in parity['prompts']):.0%}")
    metrics = _metric_parity(hf, ms_dir, root / "eval-parity")
    click.echo(f"8. ADGEN metric parity on {metrics['samples']} real dev lines, greedy: "
               f"{metrics['agreement']:.0%} identical predictions; rouge-l torch {metrics['torch']['rouge-l']:.4f} / "
               f"MindSpore {metrics['ms']['rouge-l']:.4f}")
    ok = report["ok"] and parity["passed"] and metrics["passed"]
    verdicts = [("round trip", report["ok"]), ("logits parity", parity["passed"]), ("metric parity", metrics["passed"])]
    where = f"outputs in {kept}" if kept else "outputs removed; --workdir DIR keeps them"
    click.echo("   ".join(f"{name}: {'PASS' if v else 'FAIL'}" for name, v in verdicts) + f"   ({where})")
    return 0 if ok else 1


def _metric_parity(hf: Path, ms_dir: Path, out: Path) -> dict:
    settings = EvalSettings(max_samples=4, batch_size=4, max_new_tokens=8)
    return metric_parity(hf, ms_dir, EvalRequest(ADGEN_DEV, out, settings, progress=False))


def _generate(model_dir: Path) -> str:
    use_cpu()
    reply, _ = chat(Decoder(from_pretrained(model_dir)), _tokenizer(model_dir), "你好", max_new_tokens=8)
    return reply


def _tokenizer(model_dir: Path):
    return GLM2Tokenizer(model_dir)


def _finetune(model_dir: Path, out: Path):
    cfg = TrainConfig(method="lora", max_steps=8, batch_size=4, max_source_length=32, max_target_length=32,
                      learning_rate=2e-2, warmup_steps=1)
    trainer = Trainer(model_dir, ADGEN_LINES, out, cfg, progress=False)
    losses = trainer.train()
    return losses[0], losses[-1], export(trainer)["adapter"]


def _parity(hf: Path, ms_dir: Path) -> dict:
    return run_parity(hf, ms_dir, DEFAULT_PROMPTS[:3], "float32", new_tokens=8)
