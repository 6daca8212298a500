"""The sampling defaults, one row per caller, each after the recipe that caller's users know. The numbers differ
because the recipes do; this table is where they are said, once."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    do_sample: bool
    temperature: float
    top_p: float
    recipe: str


SAMPLING = {
    # glm2_ms.SamplingConfig and model.generate(): greedy unless asked, as transformers' GenerationConfig
    "generate": Sampling(False, 1.0, 1.0, "transformers' GenerationConfig defaults"),
    # model.chat() / stream_chat(): as THUDM's ChatGLM2 modeling_chatglm.py chat() and stream_chat()
    "chat": Sampling(True, 0.8, 0.8, "THUDM's chat() in modeling_chatglm.py"),
    # the tools' --temperature / --top-p, used with --sample: THUDM's sampled ADGEN evaluation (ptuning/main.py)
    "sample": Sampling(True, 0.95, 0.7, "THUDM's ADGEN evaluation"),
}
