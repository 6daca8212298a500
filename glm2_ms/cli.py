"""`glm2-generate` and `glm2-chat`: text in, text out, streamed as it is generated."""
from __future__ import annotations

import sys

import click

from converters.cli import user_errors


class _Streamer:
    """Prints the new text of one row as tokens arrive (decoding the whole reply each time keeps multi-token
    characters intact)."""

    def __init__(self, tok, echo=True):
        self.tok, self.ids, self.shown, self.echo = tok, [], "", echo

    def __call__(self, token):
        tid = int(token[0])
        if tid in (self.tok.eos_id, self.tok.pad_id):
            return
        self.ids.append(tid)
        text = self.tok.decode(self.ids)
        if self.echo and not text.endswith("\ufffd"):
            click.echo(text[len(self.shown):], nl=False)
            self.shown = text

    def text(self) -> str:
        return self.tok.decode(self.ids)


def _sampling_options(fn):
    for opt in reversed([
        click.option("--max-new-tokens", type=int, default=64, show_default=True),
        click.option("--greedy/--sample", default=True, show_default=True, help="Greedy decoding or sampling."),
        click.option("--temperature", type=float, default=0.95, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True),
        click.option("--top-p", type=float, default=0.7, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                     help="Parameter dtype (default: the checkpoint's)."),
    ]):
        fn = opt(fn)
    return fn


def _setup(model_dir, dtype, greedy, temperature, top_k, top_p, repetition_penalty, seed):
    from .generation import Decoder, SamplingConfig
    from .loading import from_pretrained, use_cpu
    from .tokenizer import GLM2Tokenizer

    use_cpu()
    try:
        sampling = SamplingConfig(greedy, temperature, top_k, top_p, repetition_penalty, seed)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    tok = GLM2Tokenizer(model_dir)
    return tok, Decoder(from_pretrained(model_dir, dtype)), sampling


@click.command()
@click.argument("model_dir", type=click.Path(exists=True))
@click.option("--prompt", required=True, help="The text to continue (wrap it in the chat format with --chat).")
@click.option("--chat", is_flag=True, help="Format the prompt as a first chat round (build_prompt).")
@_sampling_options
@user_errors
def generate(model_dir, prompt, chat, max_new_tokens, greedy, temperature, top_k, top_p, repetition_penalty, seed,
             dtype):
    """Generate a continuation of PROMPT with the MindSpore runtime."""
    from .tokenizer import build_prompt

    tok, dec, sampling = _setup(model_dir, dtype, greedy, temperature, top_k, top_p, repetition_penalty, seed)
    stream = _Streamer(tok)
    ids = tok.encode(build_prompt(prompt) if chat else prompt)
    dec.generate([ids], max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=tok.eos_id, on_token=stream)
    click.echo()


@click.command()
@click.argument("model_dir", type=click.Path(exists=True))
@_sampling_options
@user_errors
def chat(model_dir, max_new_tokens, greedy, temperature, top_k, top_p, repetition_penalty, seed, dtype):
    """Chat with the model; `clear` forgets the history, `exit` quits."""
    from .chat import chat as reply

    tok, dec, sampling = _setup(model_dir, dtype, greedy, temperature, top_k, top_p, repetition_penalty, seed)
    history: list[tuple[str, str]] = []
    click.echo("glm2-chat: type a message; 'clear' forgets the history, 'exit' quits.")
    while True:
        try:
            query = input("\n用户: ").strip()
        except EOFError:
            break
        if query == "exit":
            break
        if query == "clear":
            history = []
            click.echo("(history cleared)")
            continue
        if not query:
            continue
        click.echo("ChatGLM2: ", nl=False)
        _, history = reply(dec, tok, query, history, max_new_tokens, sampling, _Streamer(tok))
        click.echo()
    sys.exit(0)
