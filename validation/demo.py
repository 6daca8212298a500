"""`glm2-demo`: the main job on an embedded default — no download, a few seconds.

Synthesizes a small ChatGLM2 checkpoint with the real tokenizer, converts it HF → MindSpore → HF, proves the
round trip changed nothing, and generates from the converted checkpoint with the MindSpore runtime.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from converters.cli import user_errors


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), help="Keep the outputs here (default: a temp folder).")
@user_errors
def main(workdir: Path | None):
    from converters.config import GLM2Config
    from converters.convert import convert
    from converters.inspect_verify import verify
    from converters.names import Layout
    from converters.synth import synthesize

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="glm2-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    hf, ms, back = root / "hf-tiny", root / "ms-tiny", root / "hf-roundtrip"
    cfg = GLM2Config.preset("tiny")
    files = synthesize(hf, cfg, "float16", "bin", seed=0, max_shard_bytes=10 * 10**6, overwrite=True)
    click.echo(f"1. synthesized {hf}: {len(files)} .bin shards + index, config.json, tokenizer "
               f"({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.padded_vocab_size}, float16)")
    s1 = convert(hf, ms, target=Layout("mindformers"), fmt="ckpt", overwrite=True, progress=False)
    click.echo("2. hf2ms  " + "\n   ".join(s1.lines()))
    s2 = convert(ms, back, target=Layout("chatglm"), fmt="safetensors", hf_folder=True, overwrite=True,
                 progress=False)
    click.echo("3. ms2hf  " + "\n   ".join(s2.lines()))
    report = verify(hf, back)
    exact = sum(r["bit_exact"] for r in report["tensors"])
    click.echo(f"4. verify {exact}/{report['compared']} tensors bit-exact after the round trip")
    reply = _generate(ms)
    click.echo(f"5. MindSpore runtime, greedy, 8 new tokens after the chat prompt for 你好 (random weights, so the "
               f"text is noise): {reply!r}")
    verdict = "PASS" if report["ok"] else "FAIL"
    click.echo(f"round trip: {verdict}   (outputs in {root})")
    sys.exit(0 if report["ok"] else 1)


def _generate(model_dir: Path) -> str:
    from glm2_ms.chat import chat
    from glm2_ms.generation import Decoder
    from glm2_ms.loading import from_pretrained, use_cpu
    from glm2_ms.tokenizer import GLM2Tokenizer

    use_cpu()
    reply, _ = chat(Decoder(from_pretrained(model_dir)), GLM2Tokenizer(model_dir), "你好", max_new_tokens=8)
    return reply
