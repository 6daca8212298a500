"""`glm2-generate` and `glm2-chat`: text in, text out, streamed as it is generated."""
from __future__ import annotations

import json
import resource
import time

import click

from glm2_core.errors import UserError
from glm2_core.options import ExistingPath, Tool, option, options, sampling_options

from .api import open_model
from .dialogue import chat_input, stream_chat
from .generation import describe
from .loading import use_cpu
from .sampling import SamplingConfig

NEW_TOKENS = "--max-new-tokens"


def sampling_config(sample, temperature, top_k, top_p, repetition_penalty, seed) -> SamplingConfig:
    """The vocabulary's sampling options as a SamplingConfig (their types refuse a value out of range, NaN
    included, naming the option; SamplingConfig checks again for callers in code)."""
    try:
        return SamplingConfig(not sample, temperature, top_k, top_p, repetition_penalty, seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None


# float32 arithmetic over weights kept as stored: CPU float16 matmuls are much slower than float32 ones
# (benchmarks/measure.py's kernel anchors)
# how a model loads (`_load`'s keywords): for every command that runs one
load_options = options(option("--dtype"), option("--compute-dtype"), option("--quantize"), option("--activations"),
                       option("--mmap/--no-mmap"), option("--release"))
runtime_options = options(sampling_options(max_new_tokens=64), load_options, option("--stats"))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _load(model_dir, dtype, compute_dtype, quantize, activations, mapped, release):
    """The model (on CPU), its tokenizer and the seconds it took, by `load_options`; `release` (--release) where
    the folder cannot tell: its tokenizer family, chat format and RoPE rule."""
    use_cpu()
    clock = time.perf_counter()
    with open_model(model_dir, release=release) as folder:
        tok = folder.tokenizer  # before minutes of loading: a folder without one is refused at once
        model = folder.load(None if dtype == "keep" else dtype, compute_dtype, quantize, mapped=mapped,
                            activations=activations)
    return model, tok, time.perf_counter() - clock


def _report(stats: bool, load_s: float, decoder) -> None:
    """--stats: one line on stderr."""
    if stats and decoder.timings is not None:
        click.echo(f"stats: load {load_s:.1f} s, peak RSS {peak_rss_gb():.2f} GB, {describe(decoder.timings)}",
                   err=True)


def _echo_growing(texts) -> str:
    """Print each text's new end as it grows; returns the last one."""
    shown = ""
    for text in texts:
        click.echo(text[len(shown):] if text.startswith(shown) else "\n" + text, nl=False)
        shown = text
    return shown


@click.command("glm2-generate", cls=Tool)
@click.argument("model_dir", type=ExistingPath())
@click.option("--prompt", required=True, help="The text to continue (wrap it in the chat format with --chat).")
@click.option("--chat", is_flag=True, help="Format the prompt as a first chat round (the model family's format).")
@runtime_options
def generate(model_dir, prompt, chat, max_new_tokens, sample, temperature, top_k, top_p, repetition_penalty, seed,
             stats, **loading):
    """Generate a continuation of PROMPT with the MindSpore runtime of the model in MODEL_DIR."""
    sampling = sampling_config(sample, temperature, top_k, top_p, repetition_penalty, seed)
    model, tok, load_s = _load(model_dir, **loading)
    ids = tok.build_chat_input(prompt) if chat else tok.encode(prompt)
    model.decoder.budget((1, len(ids)), max_new_tokens, option=NEW_TOKENS)
    tokens = model.decoder.stream([ids], max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=tok.stop_ids,
                                  pad_token_id=tok.pad_id)
    _echo_growing(tok.decode_stream(tokens))
    click.echo()
    _report(stats, load_s, model.decoder)


@click.command("glm2-chat", cls=Tool)
@click.argument("model_dir", type=ExistingPath())
@runtime_options
def chat(model_dir, max_new_tokens, sample, temperature, top_k, top_p, repetition_penalty, seed, stats,
         **loading):
    """Chat with the model in MODEL_DIR, the history kept: `clear` forgets it, `exit` (or Ctrl-D) quits, Ctrl-C
    stops. The line is edited with readline (arrows, history). A message whose round (the history, the message and
    --max-new-tokens) would pass the model's context, or not fit in memory, is not sent: the chat goes on, the
    history unchanged, and `clear` makes room."""
    import readline  # noqa: F401, PLC0415  (for its effect on input(): line editing and history, in a chat only)

    sampling = sampling_config(sample, temperature, top_k, top_p, repetition_penalty, seed)
    model, tok, load_s = _load(model_dir, **loading)
    model.decoder.budget(chat_input(tok, "").shape, max_new_tokens, option=NEW_TOKENS)  # not even a first round
    history: list = []
    click.echo("glm2-chat: type a message; 'clear' forgets the history, 'exit' quits.")
    while True:
        try:
            query = input("\n用户: ").strip()
        except EOFError:
            click.echo()  # Ctrl-D ends the prompt's line: the shell's prompt starts on a line of its own
            break
        if query == "exit":
            break
        if query == "clear":
            history = []
            click.echo("(history cleared)")
            continue
        if not query:
            continue
        if not _round_fits(model.decoder, chat_input(tok, query, history), max_new_tokens):
            continue
        click.echo(f"{tok.family.title}: ", nl=False)
        histories = []
        _echo_growing(_texts(stream_chat(model.decoder, tok, query, history, max_new_tokens, sampling), histories))
        history = histories[-1] if histories else history
        click.echo()
        _report(stats, load_s, model.decoder)


def _round_fits(decoder, ids, max_new_tokens: int) -> bool:
    """Whether a chat round fits (`Decoder.budget`); if not, says why on stderr: the chat goes on without it."""
    try:
        decoder.budget(ids.shape, max_new_tokens, option=NEW_TOKENS)
    except UserError as exc:
        click.echo(f"(not sent: {exc}; the history counts too: 'clear' forgets it)", err=True)
        return False
    return True


def _texts(rounds, histories: list):
    """The replies as text (a tool call as JSON), keeping each round's history."""
    for reply, history in rounds:
        histories.append(history)
        yield reply if isinstance(reply, str) else json.dumps(reply, ensure_ascii=False)
