"""The GLM releases this toolkit knows, one record each: how a folder names it, its tokenizer and chat family and its
RoPE rule. Adding a release is adding a record here (and its tests).

Three words, three things: a **release** is a published model (chatglm2-6b-32k); its **family** is the tokenizer and
chat format it shares with others (`glm2_core.families.FAMILIES`); a **layout** is how a checkpoint names its weights
(`glm2_core.names.LAYOUTS`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import CheckpointError
from .files import CONFIG

# RoPE rules: how config.json's `rope_ratio` (r) enters the angles position·θ_i, θ_i = base^(−2i/64).
BASE = "base"            # base = 10000·r (ChatGLM3-32k/128k, GLM-4: THUDM's `base = base * rope_ratio`)
POSITIONS = "positions"  # base 10000, positions / r: linear interpolation (ChatGLM2-6B-32k's `seq_idx / rope_ratio`)
ROPE_BASE = 10000.0
GLM4_VOCAB = 151552


@dataclass(frozen=True)
class Release:
    name: str                # the Hugging Face repository's name, lower case; a folder's `_name_or_path` names it
    family: str              # tokenizer and chat format: chatglm2, chatglm3 or glm4
    rope: str = BASE         # how rope_ratio scales RoPE (BASE or POSITIONS)
    sandwich: bool = False   # two more RMSNorms per layer, on the attention's and the MLP's output (GLM-4-0414)
    hf: str = ""             # the repository's name as spelled on the hub, where it has capitals
    native: str = "chatglm"  # the weight layout its HF folder uses (glm2_core.names.LAYOUTS)
    org: str = "THUDM"

    @property
    def repo(self) -> str:
        return f"{self.org}/{self.hf or self.name}"


RELEASES = {r.name: r for r in (
    # ChatGLM2's modeling code reads rope_ratio only in its 32k release, where it divides the positions
    Release("chatglm2-6b", "chatglm2", POSITIONS),
    Release("chatglm2-6b-32k", "chatglm2", POSITIONS),
    Release("chatglm3-6b", "chatglm3"),
    Release("chatglm3-6b-base", "chatglm3"),
    Release("chatglm3-6b-32k", "chatglm3"),
    Release("chatglm3-6b-128k", "chatglm3"),
    Release("glm-4-9b", "glm4"),
    Release("glm-4-9b-chat", "glm4"),
    Release("glm-4-9b-chat-1m", "glm4"),
    Release("glm-4-9b-chat-hf", "glm4", native="glm"),  # glm-4-9b-chat as transformers' GlmForCausalLM
    # GLM-4-0414: transformers' Glm4ForCausalLM (its config.json names no release: model_type glm4 tells it)
    *(Release(hf.lower(), "glm4", sandwich=True, hf=hf, native="glm") for hf in (
        "GLM-4-9B-0414", "GLM-4-32B-0414", "GLM-4-32B-Base-0414", "GLM-Z1-9B-0414", "GLM-Z1-32B-0414",
        "GLM-Z1-Rumination-32B-0414")),
)}
# a folder that names no release by its full name: the one it most likely is, by a part of its name (or vocabulary)
FAMILY_RELEASES = {"chatglm2": "chatglm2-6b", "chatglm3": "chatglm3-6b", "glm4": "glm-4-9b-chat"}
SANDWICH_RELEASE = "glm-4-9b-0414"  # a Glm4ForCausalLM config that names no release
TOLD_BY_USER = "--release"  # a config's `told_by` when the user named the release


def identify(name_or_path, padded_vocab_size: int, rope_ratio: float = 1.0, source: str = CONFIG,
             sandwich: bool | None = None) -> tuple[str, str]:
    """The release a config describes, and what told it: the longest release name in its `_name_or_path` (any path:
    the HF id, a hub cache folder, a local copy); else its family by a part of the name or by GLM-4's vocabulary. A
    ChatGLM-vocabulary config with a rope_ratio and no name is refused: the two rules differ and guessing would give
    a wrong model. `sandwich`: the config's architecture says whether the layers have GLM-4-0414's extra norms."""
    name = name_or_path.lower() if isinstance(name_or_path, str) else ""
    named = [r for r, rel in RELEASES.items() if r in name and sandwich in (None, rel.sandwich)]
    said = f"_name_or_path {name_or_path!r:.80}"
    if named:
        return max(named, key=len), f"named in {said}"
    if sandwich:
        return SANDWICH_RELEASE, "transformers' Glm4ForCausalLM config (GLM-4-0414's layers; no release named)"
    if "chatglm3" in name:
        return FAMILY_RELEASES["chatglm3"], f"'chatglm3' in {said}"
    if "glm-4" in name or "glm4" in name or padded_vocab_size == GLM4_VOCAB:
        return FAMILY_RELEASES["glm4"], f"GLM-4 by {said if 'glm' in name else f'its vocabulary of {GLM4_VOCAB}'}"
    if "chatglm2" in name or rope_ratio == 1:
        return FAMILY_RELEASES["chatglm2"], (f"'chatglm2' in {said}" if name else
                                             "no release named; ChatGLM2's vocabulary and RoPE")
    raise CheckpointError(
        f"{source}: rope_ratio {rope_ratio!s:.40} but _name_or_path {name_or_path!r:.60} names no release: "
        f"ChatGLM2-6B-32k divides the positions by it, ChatGLM3-6B-32k/128k multiply the base; set _name_or_path to "
        f"{RELEASES['chatglm2-6b-32k'].repo} or {RELEASES['chatglm3-6b-32k'].repo}")


def rope_rule(release: str, rope_ratio: float) -> tuple[float, float]:
    """(base, position scale) of a release's RoPE: angles are (position / scale) · base^(−2i/d)."""
    if rope_ratio == 1 or RELEASES[release].rope == BASE:
        return ROPE_BASE * rope_ratio, 1.0
    return ROPE_BASE, float(rope_ratio)
