"""The one CLI vocabulary of every glm2-* tool: each option that more than one tool takes is defined here once
(flag, type, default, help), and `Tool` is the command class all of them use.

`Tool` ends every user error with one line `error: <what>` on stderr and exit status 1 (click's own usage errors
and missing paths included) and stops on Ctrl-C with exit status 130. It also accepts a command's old option
spellings as hidden aliases, each saying it is one.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

import click

from . import PACKAGE
from .dtypes import ACTIVATIONS, COMPUTE_DTYPES, DTYPES, GGUF_QUANTS
from .errors import CheckpointError, UserError
from .names import FORMAT_NAMES, HF_LAYOUTS, LAYOUTS, MS_LAYOUTS
from .recipes import SAMPLING
from .releases import RELEASES

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


class Interrupted(Exception):
    """A tool stopped on Ctrl-C; the message says what it kept."""


class ExistingPath(click.Path):
    """A path that must exist; a missing one is a user error in the tools' own words, not click's."""

    def __init__(self):
        super().__init__(path_type=Path)

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        return path


PATH = click.Path(path_type=Path)  # an output path, or an input the tool itself checks


class Number(click.FloatRange):
    """A FloatRange that refuses NaN too: every comparison with NaN is false, so a plain range lets it through."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


# the ranges of numeric options: a value outside is refused by click, in one line
POSITIVE, COUNT, AT_LEAST_ONE = Number(min=0, min_open=True), click.IntRange(min=0), click.IntRange(min=1)
PROBABILITY, SEED = Number(0, 1, min_open=True), click.IntRange(0, 2**32 - 1)
TOLERANCE, FRACTION = Number(min=0), Number(0, 1)  # an absolute or relative difference allowed; a share

# flag → click.option keyword arguments (a `decls` entry: the declarations, when not just the flag)
VOCABULARY: dict[str, dict] = {
    # weights and files
    "--dtype": dict(type=click.Choice(DTYPES), default="keep", help="Dtype of the weights{keep}."),
    "--compute-dtype": dict(type=click.Choice(COMPUTE_DTYPES), default="float32",
                            help="Dtype of the arithmetic (the weights are cast where they are used)."),
    "--quantize": dict(type=click.Choice(GGUF_QUANTS), default=None,
                       show_default="the weights as stored (a q8_0/q4_0 GGUF file or THUDM int4/int8 folder keeps its "
                                    "own blocks)",
                       help="Quantize the weight matrices as they load, to llama.cpp's q8_0 or q4_0 blocks, which "
                            "the native kernel computes with in float32 (q4_0 keeps the output layer in q8_0)."),
    "--activations": dict(type=click.Choice(ACTIVATIONS), default="float32",
                          help="What weights in q8_0/q4_0 blocks multiply with: float32 (exact), or the activations "
                               "quantized to q8_0 blocks with integer sums per block, as llama.cpp computes (faster, "
                               "not exact)."),
    "--mmap/--no-mmap": dict(decls=("--mmap/--no-mmap", "mapped"), default=True,
                             help="Use a GGUF file's weights where they lie (mapped, read and checked beside the "
                                  "first prompt; the file must not change while the model runs), or read them "
                                  "into memory first."),
    "--layout": dict(type=click.Choice(MS_LAYOUTS + HF_LAYOUTS), default="mindformers",
                     help="Weight names of the output: {layouts}."),
    "--format": dict(decls=("--format", "fmt"), type=click.Choice(FORMAT_NAMES),
                     help="File format of the weights."),
    "--max-shard-size": dict(default="2GB", help="Largest weights file of a HF folder (e.g. 2GB, 500MB)."),
    "--config": dict(type=ExistingPath(), default=None, show_default="the config.json beside {src}",
                     help="config.json of {src} when none is beside it (without one, the sizes are inferred from "
                          "the shapes, assuming ChatGLM2's head size 128)."),
    "--rearranged-rope": dict(is_flag=True, default=None,
                              help="{src} has MindFormers' rearranged RoPE rows (a folder glm2-convert wrote says so "
                                   "in its manifest.json)."),
    "--keep-optimizer": dict(is_flag=True, help="Keep the optimizer state (adam_m.* / adam_v.*) instead of "
                                                "dropping it (MindSpore output only)."),
    "--allow-overflow": dict(is_flag=True, help="Write float16 values that overflow as inf instead of refusing."),
    "--no-crc-check": dict(is_flag=True, help="Read data whose checksum (a .bin record's CRC-32, a .ckpt's CRC "
                                              "trailer) does not match, for forensics. Off by default: a mismatch is "
                                              "an error."),
    "--overwrite": dict(is_flag=True, help="Replace the output folder if it exists."),
    "--strategy": dict(type=ExistingPath(), required=True,
                       help="Parallel strategy: a file (protobuf or .json) or a folder of per-stage / per-rank "
                            "files."),
    "--lora-alpha": dict(type=POSITIVE, default=None,
                         help="LoRA alpha: the adapter's update B·A is scaled by alpha / r."),
    # generation
    # the releases are named by the metavar, not listed: --help (and the CLI reference) stay as they are when a
    # release is added; a name that is not one is refused with the list
    "--release": dict(type=click.Choice(tuple(RELEASES)), default=None, metavar="RELEASE",
                      show_default="the one the folder tells: its config.json; glm2-convert inspect says which",
                      help="The published model the folder holds (a release name of docs/releases.md, lower case, "
                           "e.g. chatglm2-6b-32k): its tokenizer, chat format, RoPE rule and layers "
                           "(for a finetune saved under a local name)."),
    "--max-new-tokens": dict(type=AT_LEAST_ONE, help="Generate at most this many new tokens (bounded "
                                                             "by the model's context and the memory its cache "
                                                             "needs)."),
    "--sample/--greedy": dict(decls=("--sample/--greedy", "sample"), default=False,
                              help="Sample each token (with --temperature, --top-k, --top-p, --seed), or take the "
                                   "most likely one."),
    "--temperature": dict(type=POSITIVE, default=SAMPLING["sample"].temperature,
                          help="Sampling temperature (> 0; lower is more conservative)."),
    "--top-k": dict(type=COUNT, default=0, help="Sample among the k most likely tokens only (0: no limit)."),
    "--top-p": dict(type=PROBABILITY, default=SAMPLING["sample"].top_p,
                    help="Sample from the smallest set of tokens whose probabilities "
                                                  "reach p (1: no limit)."),
    "--repetition-penalty": dict(type=POSITIVE, default=1.0,
                                 help="Penalise the tokens already in the text by this factor (1: off)."),
    "--seed": dict(type=SEED, default=0, help="Random seed: the same seed repeats a run exactly."),
    # data and runs
    "--batch-size": dict(type=AT_LEAST_ONE, help="Sequences per batch (per process under msrun)."),
    "--out": dict(decls=("--out", "out_dir"), type=PATH, help="Output folder (what goes in it: see above)."),
    "--resume": dict(is_flag=True, help="Continue the run in --out where it stopped (with the same settings)."),
    "--variant": dict(type=click.Choice(("thudm", "mindformers")), default="thudm",
                      help="Averaging of the metrics: thudm counts every sample, mindformers skips blank "
                           "predictions."),
    "--quiet": dict(is_flag=True, help="No progress bar."),
    "--stats": dict(is_flag=True, help="Also report load time, peak RSS, and prefill and decode tokens/s."),
    # parity
    "--streamed/--whole": dict(decls=("--streamed/--whole", "streamed"), default=None,
                               show_default="streamed when the two whole models do not fit in the memory available",
                               help="Run both sides layer by layer, one block per side in memory, read straight "
                                    "from the checkpoints (greedy tokens then come from each whole model in turn, "
                                    "its weights as stored), or both whole models side by side."),
    "--json": dict(decls=("--json", "as_json"), is_flag=True, help="Print the result as JSON."),
}
_UNSET = object()


class VocabularyOption(click.Option):
    """An option made from VOCABULARY (tests check that an option several tools share is one of these)."""


def option(flag: str, *, default=_UNSET, choices=None, show_default=None, required=None, src: str = "SRC",
           type=None):
    """The decorator of VOCABULARY's `flag`. A tool may narrow the choices, set the range of a number (`type`) and
    the default, but never the meaning: the help is the vocabulary's (`{src}` in it names the tool's input
    argument, `{layouts}` lists the layouts it takes)."""
    spec = dict(VOCABULARY[flag])
    decls = spec.pop("decls", (flag,))
    names = choices or getattr(spec.get("type"), "choices", ())
    layouts = ", ".join(f"{name} ({LAYOUTS[name].what})" for name in names if name in LAYOUTS)
    keep = " (keep: as they are stored)" if "keep" in names else ""
    spec["help"] = spec["help"].format(src=src, layouts=layouts, keep=keep)
    if "show_default" in spec:
        spec["show_default"] = spec["show_default"].format(src=src)
    if choices is not None:
        spec["type"] = click.Choice(choices)
    if type is not None:
        spec["type"] = type
    if default is not _UNSET:
        spec["default"] = default
    if required is not None:
        spec["required"] = required
    if show_default is not None:
        spec["show_default"] = show_default
    spec.setdefault("show_default", not spec.get("is_flag") and spec.get("default") is not None)
    return click.option(*decls, cls=VocabularyOption, **spec)


def options(*decorators):
    """Several option decorators applied as one, in the order given (as they appear in --help)."""
    def apply(fn):
        for decorate in reversed(decorators):
            fn = decorate(fn)
        return fn
    return apply


def sampling_options(max_new_tokens: int):
    return options(option("--max-new-tokens", default=max_new_tokens), option("--sample/--greedy"),
                   option("--temperature"), option("--top-k"), option("--top-p"), option("--repetition-penalty"),
                   option("--seed"))


# ---- the command class
_HELP_ONLY = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click ≥ 8.2: a group run without a command


class _Tool:
    """What every glm2-* command adds to click's: one-line errors, Ctrl-C, aliases, several usage lines, and
    subcommands dispatched by their first word (`glm2-eval score FILE`) beside a main form that takes paths."""

    def __init__(self, *args, aliases: dict | None = None, usage: tuple[str, ...] = (),
                 interrupted: str = "interrupted", subcommands: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(p.name == "version" for p in self.params):
            self.params.append(click.Option(["--version"], is_flag=True, expose_value=False, is_eager=True,
                                            callback=_show_version, help="Show the version and exit."))
        self.aliases, self.usage_lines = aliases or {}, usage
        self.interrupted, self.subcommands = interrupted, subcommands or {}

    def main(self, args=None, prog_name=None, **extra):
        args = sys.argv[1:] if args is None else list(args)
        if args and args[0] in self.subcommands:
            return self.subcommands[args[0]].main(args[1:], f"{prog_name or self.name} {args[0]}", **extra)
        extra.pop("standalone_mode", None)
        with _interrupts():
            try:
                status = super().main(args, prog_name, standalone_mode=False, **extra)
            except UserError as exc:
                _fail(str(exc))
            except _HELP_ONLY as exc:  # its help, as click shows it
                click.echo(exc.format_message(), err=True)
                sys.exit(1)
            except click.ClickException as exc:
                _fail(_describe(exc))
            except Interrupted as exc:
                _stop(f"interrupted: {exc}")
            except (click.Abort, KeyboardInterrupt):  # (click.Abort is a RuntimeError: before the next clause)
                _stop(self.interrupted)
            except (MemoryError, RuntimeError) as exc:
                if isinstance(exc, RuntimeError) and "Memory not enough" not in str(exc):
                    raise  # any other RuntimeError is a bug: its traceback goes on up
                _fail(_out_of_memory(exc))
            except ModuleNotFoundError as exc:
                missing_extra(self.name, exc)
            except OSError as exc:  # a path the tool could not read or write (permissions, a full disk, …)
                _fail(_os_error(exc))
        sys.exit(status if isinstance(status, int) else 0)

    def parse_args(self, ctx, args):
        used: list[str] = []
        args = unalias(list(args), self.aliases, used)
        for old in dict.fromkeys(used):  # an old spelling still works, and says it is one, once
            new = self.aliases[old][0] if isinstance(self.aliases[old], tuple) else self.aliases[old]
            click.echo(f"warning: {old} is an old spelling of {new or 'the positional argument'}, and will be "
                       f"removed", err=True)
        return super().parse_args(ctx, args)

    def format_usage(self, ctx, formatter):
        if not self.usage_lines:
            return super().format_usage(ctx, formatter)
        for i, line in enumerate(self.usage_lines):
            formatter.write_usage(ctx.command_path, line, "Usage: " if i == 0 else "       ")


def _out_of_memory(exc: Exception) -> str:
    """The one line for an allocation that failed (numpy's MemoryError, MindSpore's "Memory not enough")."""
    text = str(exc)
    size = re.search(r"alloc size: (\d+)B", text)
    what = f"{int(size.group(1)) / 2**20:.0f} MiB more" if size else text.splitlines()[0] if text else "memory"
    return f"out of memory: could not allocate {what} beyond the RAM this process could get"


def _os_error(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else "a file"
    return f"{where}: {exc.strerror or exc}" + (f" ({exc.filename2})" if exc.filename2 else "")


# the modules of the optional extras (pyproject.toml's [project.optional-dependencies]) whose distribution is
# named otherwise
_DISTRIBUTIONS = {"yaml": "pyyaml", "rouge_chinese": "rouge-chinese"}


def extra_of(module: str) -> str | None:
    """The narrowest extra of this package that installs `module` (from the installed package's metadata)."""
    dist = _DISTRIBUTIONS.get(module.split(".")[0], module.split(".")[0]).lower()
    try:
        requirements = requires(PACKAGE) or []
    except PackageNotFoundError:
        return None
    for requirement in requirements:
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
        if extra and name == dist.replace("_", "-"):
            return extra.group(1)
    return None


def missing_extra(tool: str, exc: ModuleNotFoundError) -> None:
    """The one line of a tool whose extra is not installed; any other missing module is a bug, raised on."""
    extra = extra_of(exc.name or "")
    if extra is None:
        raise exc
    _fail(f"{tool} needs the [{extra}] extra (no module {exc.name!r}): pip install '{PACKAGE}[{extra}]'")


def _show_version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        click.echo(f"{ctx.command_path} {version(PACKAGE)}")
        ctx.exit()


class Tool(_Tool, click.Command):
    pass


class ToolGroup(_Tool, click.Group):
    command_class = Tool


def unalias(args: list[str], aliases: dict, used: list | None = None) -> list[str]:
    """Old spellings → the vocabulary. `aliases`: old flag → new flag (None: its value becomes a positional
    argument), or (new flag, {old value: new value}). Rewritten options go first, so that the new spelling given
    later on the line wins; the old flags met are appended to `used`."""
    front, rest, it = [], [], iter(args)
    for arg in it:
        if arg == "--":
            rest += [arg, *it]
            break
        flag, eq, value = arg.partition("=")
        if flag not in aliases:
            rest.append(arg)
            continue
        value = value if eq else next(it, "")
        if used is not None:
            used.append(flag)
        new, values = aliases[flag] if isinstance(aliases[flag], tuple) else (aliases[flag], {})
        value = values.get(value, value)
        front += [new, value] if new else [value]
    return front + rest


def _describe(exc: click.ClickException) -> str:
    if isinstance(exc, click.BadParameter) and not isinstance(exc, click.MissingParameter) and exc.param:
        name = exc.param.opts[0] if isinstance(exc.param, click.Option) else exc.param.human_readable_name
        return f"{name}: {exc.message}"
    message = exc.format_message()
    if isinstance(exc, click.UsageError) and exc.ctx is not None:
        message += f" (see {exc.ctx.command_path} --help)"
    return message


def one_line(text: str) -> str:
    """Names and values from a hostile file can hold line breaks and control characters: escape them."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _fail(message: str) -> None:
    click.echo(f"error: {one_line(message)}", err=True)
    sys.exit(1)


def _stop(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(INTERRUPTED)


def _interrupt(signum, frame):
    """SIGINT and SIGTERM: KeyboardInterrupt, raised in our own code. When the main thread is inside MindSpore's
    Python code (compiling a graph, or in the wrapper of a graph run or an op), an exception there is reported as
    a compile failure (an [ERROR] trace on stderr, analyze_fail.ir dumped into the current folder); so it is
    raised in the frame that called MindSpore, as soon as that frame runs again."""
    caller = _mindspore_caller(frame)
    if caller is None:
        raise KeyboardInterrupt
    caller.f_trace = _raise_in_frame
    sys.settrace(_trace_nothing)  # enables the frame's trace; frames started from now on are not traced


def _mindspore_caller(frame):
    """The frame that called into MindSpore, when `frame` runs inside it (or in code MindSpore called)."""
    package = sys.modules.get("mindspore")
    if package is None:
        return None
    root = os.path.dirname(package.__file__) + os.sep
    caller = None
    while frame is not None:
        if frame.f_code.co_filename.startswith(root):
            caller = frame.f_back
        frame = frame.f_back
    return caller


def _trace_nothing(frame, event, arg):
    return None


def _raise_in_frame(frame, event, arg):
    sys.settrace(None)
    raise KeyboardInterrupt


@contextmanager
def _interrupts():
    """Ctrl-C → `_interrupt` while the tool runs; SIGTERM too, because once MindSpore has run an op its runtime's
    SIGINT handler (`mindspore::SignalGuard`'s `DefaultIntHandler`, left installed) turns Ctrl-C into
    `kill(getpid(), SIGTERM)`, which would otherwise end the process "Terminated" without our handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
