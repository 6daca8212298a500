"""The glm2-* console scripts. Each imports its tool's module when it runs, for two things that must happen before
that import: the modules of the tools that run a model import MindSpore (and torch) at their top, so a missing
extra shows there, and becomes the tool's one-line error instead of a traceback; and a worker that msrun started
gets MindSpore's log level, which MindSpore reads when it is imported."""
from __future__ import annotations

import importlib
import os
from functools import partial

import click

from .options import missing_extra

TOOLS = {  # tool → its click command, as module:attribute (pyproject.toml's scripts run these through `run`)
    "glm2-convert": "converters.cli:main",
    "glm2-merge-shards": "converters.shards_cli:main",
    "glm2-generate": "glm2_ms.cli:generate",
    "glm2-chat": "glm2_ms.cli:chat",
    "glm2-finetune": "glm2_ms.finetune_cli:main",
    "glm2-parity": "validation.cli:main",
    "glm2-eval": "validation.eval_cli:main",
    "glm2-demo": "validation.demo:main",
    "glm2-serve": "glm2_ms.serve:main",
}


def command(tool: str) -> click.Command:
    """The click command of `tool`, its module imported."""
    module, _, name = TOOLS[tool].partition(":")
    return getattr(importlib.import_module(module), name)


def run(tool: str) -> None:
    if "MS_ROLE" in os.environ:  # a worker msrun started: MindSpore's connection retries and notes, errors only
        os.environ.setdefault("GLOG_v", "3")  # (GLOG_v=1 shows them)
    try:
        cmd = command(tool)
    except ModuleNotFoundError as exc:
        missing_extra(tool, exc)
    cmd.main(prog_name=tool)


convert = partial(run, "glm2-convert")
merge_shards = partial(run, "glm2-merge-shards")
generate = partial(run, "glm2-generate")
chat = partial(run, "glm2-chat")
finetune = partial(run, "glm2-finetune")
parity = partial(run, "glm2-parity")
evaluate = partial(run, "glm2-eval")
demo = partial(run, "glm2-demo")
serve = partial(run, "glm2-serve")
