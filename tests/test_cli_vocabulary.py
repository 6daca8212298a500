"""One CLI language: every glm2-* tool (as installed) spells a concept the same way, from one definition; every
option has help and shows its default; every user error is one line `error: …` with exit status 1."""
import json
import re
from dataclasses import fields
from importlib.metadata import entry_points, version

import click
import pytest
from click.testing import CliRunner
from conftest import DATA

from glm2_core import launch
from glm2_core.dtypes import COMPUTE_DTYPES, GGUF_QUANTS, WEIGHT_DTYPES
from glm2_core.options import VOCABULARY, Tool, VocabularyOption, unalias
from glm2_ms.finetune_cli import train_config
from glm2_ms.train_config import TrainConfig

TOOLS = {name: launch.command(name) for name in launch.TOOLS}
SAMPLING = {"--max-new-tokens", "--sample", "--greedy", "--temperature", "--top-k", "--top-p", "--repetition-penalty",
            "--seed"}


def test_every_script_runs_its_tool_through_the_launcher():
    scripts = {ep.name: ep.load() for ep in entry_points(group="console_scripts") if ep.name.startswith("glm2-")}
    assert set(scripts) == set(TOOLS) == {"glm2-convert", "glm2-merge-shards", "glm2-generate", "glm2-chat",
                                          "glm2-parity", "glm2-finetune", "glm2-eval", "glm2-demo", "glm2-serve"}
    assert all(script.func is launch.run and script.args == (name,) for name, script in scripts.items())


def commands():
    """(name, command) of every command a user can run, subcommands included."""
    for name, tool in TOOLS.items():
        subs = dict(getattr(tool, "commands", {}), **getattr(tool, "subcommands", {}))
        if not isinstance(tool, click.Group):
            yield name, tool
        yield from ((f"{name} {sub}", cmd) for sub, cmd in subs.items())


def options_of(cmd):
    return [p for p in cmd.params if isinstance(p, click.Option) and p.name not in ("help", "version")]


def flags(cmd) -> dict:
    return {flag: p for p in options_of(cmd) for flag in p.opts + p.secondary_opts}


def invoke(tool, *args):
    return CliRunner().invoke(TOOLS[tool], [str(a) for a in args])


def one_error_line(result, *needles):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_every_option_has_help_and_shows_its_default():
    for name, cmd in commands():
        assert cmd.help and cmd.help.strip(), f"{name} has no description"
        for opt in options_of(cmd):
            assert opt.help, f"{name} {opt.opts[0]}: no help"
            if not opt.is_flag and not opt.required:
                assert opt.show_default and (opt.default is not None or isinstance(opt.show_default, str)), \
                    f"{name} {opt.opts[0]}: default not shown"


def test_options_several_tools_share_are_defined_once():
    users: dict[str, set] = {}
    for name, cmd in commands():
        for flag, opt in flags(cmd).items():
            users.setdefault(flag, set()).add(name)
            if isinstance(opt, VocabularyOption):
                key = next(k for k in VOCABULARY if flag in k.split("/"))
                template = re.escape(VOCABULARY[key]["help"]).replace(r"\{src\}", ".+").replace(r"\{layouts\}", ".+") \
                    .replace(r"\{keep\}", ".*")
                assert re.fullmatch(template, opt.help), (name, flag)
    for flag, names in users.items():
        if len(names) > 1:
            for name, cmd in commands():
                if name in names:
                    assert isinstance(flags(cmd)[flag], VocabularyOption), f"{name} {flag} is not the vocabulary's"
    assert {"--dtype", "--compute-dtype", "--layout", "--seed", "--sample", "--out", "--lora-alpha"} <= \
        {f for f, n in users.items() if len(n) > 1}


def test_the_vocabulary_means_one_thing_everywhere():
    by_name = dict(commands())
    for name, cmd in by_name.items():
        f = flags(cmd)
        if "--dtype" in f:  # the weights' dtype, never the arithmetic's (a GGUF file's may be llama.cpp's blocks)
            allowed = {"keep", *WEIGHT_DTYPES, *(GGUF_QUANTS if name == "glm2-convert to-gguf" else ())}
            assert set(f["--dtype"].type.choices) <= allowed, name
        if "--compute-dtype" in f:
            assert tuple(f["--compute-dtype"].type.choices) == COMPUTE_DTYPES, name
        if "--layout" in f:  # ms2hf --target, merge-lora --hf and glm2-merge-shards --to are gone
            assert not {"--target", "--hf", "--to"} & set(f), name
    for name in ("glm2-generate", "glm2-chat", "glm2-eval"):
        assert set(flags(by_name[name])) >= SAMPLING, name
        assert flags(by_name[name])["--sample"].secondary_opts == ["--greedy"]
    for name in ("glm2-generate", "glm2-chat", "glm2-finetune", "glm2-eval"):
        assert by_name[name].params[0].name == "model_dir" and isinstance(by_name[name].params[0], click.Argument)
    assert "--compute-dtype" in flags(by_name["glm2-parity"]) and "--dtype" not in flags(by_name["glm2-parity"])


def test_every_training_setting_is_a_flag_and_given_flags_override_the_file(tmp_path):
    cmd = TOOLS["glm2-finetune"]
    generated = {p.name: p for p in options_of(cmd)}
    for f in fields(TrainConfig):
        assert f.name in generated, f.name
        assert generated[f.name].default == f.default and generated[f.name].show_default
    for name in ("lr_power", "beta1", "beta2", "eps", "loss_scale", "loss_scale_factor", "loss_scale_window",
                 "log_steps"):
        assert f"--{name.replace('_', '-')}" in flags(cmd)
    run = tmp_path / "run.yaml"
    run.write_text("lora_rank: 4\nbeta2: 0.8\nshard_optimizer: true\n")
    args = ["m", "--train-data", "d", "--out", "o", "--train-config", str(run), "--beta2", "0.9", "--eps", "1e-6",
            "--loss-scale-window", "7", "--log-steps", "3", "--no-shard-optimizer", "--optimizer", "adamw",
            "--no-recompute"]
    with cmd.make_context("glm2-finetune", [a if a not in ("m", "d") else str(tmp_path) for a in args]) as ctx:
        cfg = train_config(ctx.params["config_file"], {f.name: ctx.params[f.name] for f in fields(TrainConfig)})
    assert (cfg.lora_rank, cfg.beta2, cfg.eps, cfg.loss_scale_window, cfg.log_steps) == (4, 0.9, 1e-6, 7, 3)
    assert cfg.shard_optimizer is False and cfg.optimizer == "adamw" and cfg.lr_power == 1.0 and not cfg.recompute


@pytest.mark.parametrize("tool, args", [
    ("glm2-convert", ["hf2ms", "{missing}", "{tmp}/o"]), ("glm2-convert", ["ms2hf", "{missing}", "{tmp}/o"]),
    ("glm2-convert", ["inspect", "{missing}"]), ("glm2-convert", ["verify", "{data}", "{missing}"]),
    ("glm2-convert", ["merge-lora", "{missing}", "{missing}", "{tmp}/o"]),
    ("glm2-convert", ["ms2hf", "{data}", "{tmp}/o", "--config", "{missing}"]),
    ("glm2-merge-shards", ["{tmp}", "{tmp}/o", "--strategy", "{missing}"]),
    ("glm2-merge-shards", ["split", "{missing}", "{tmp}/o", "--strategy", "{data}"]),
    ("glm2-generate", ["{missing}", "--prompt", "x"]), ("glm2-chat", ["{missing}"]),
    ("glm2-parity", ["{missing}", "{tmp}"]), ("glm2-parity", ["{tmp}", "{missing}"]),
    ("glm2-finetune", ["{missing}", "--train-data", "{data}", "--out", "{tmp}/o"]),
    ("glm2-finetune", ["{tmp}", "--train-data", "{missing}", "--out", "{tmp}/o"]),
    ("glm2-eval", ["{missing}", "--data", "{data}"]), ("glm2-eval", ["{tmp}", "--data", "{missing}"]),
    ("glm2-eval", ["score", "{missing}"]),
])
def test_a_missing_path_is_one_line_naming_it(tool, args, tmp_path):
    missing = tmp_path / "no-such"
    filled = [a.format(missing=missing, tmp=tmp_path, data=DATA / "adgen_dev.json") for a in args]
    one_error_line(invoke(tool, *filled), f"{missing}: no such file or folder")


def test_usage_errors_are_one_line_too(tmp_path):
    one_error_line(invoke("glm2-generate", tmp_path, "--prompt", "x", "--bogus"), "--bogus", "--help")
    one_error_line(invoke("glm2-generate", tmp_path), "--prompt")
    one_error_line(invoke("glm2-generate", tmp_path, "--prompt", "x", "--top-p", "1.5"), "--top-p", "0<x<=1")
    one_error_line(invoke("glm2-convert", "hf2ms", tmp_path, tmp_path / "o", "--layout", "glm"), "--layout: 'glm'")
    one_error_line(invoke("glm2-eval", tmp_path, tmp_path, "--data", DATA / "adgen_dev.json"), "--parity")
    one_error_line(invoke("glm2-convert", "merge-lora", tmp_path, tmp_path, tmp_path / "o", "--format", "bin"),
                   "--format bin does not go with --layout mindformers")


@pytest.mark.runtime
def test_finetune_names_a_bad_data_file(hf_tiny, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json\n" + json.dumps({"content": "x"}) + "\n")
    line = one_error_line(invoke("glm2-finetune", hf_tiny(), "--train-data", bad, "--out", tmp_path / "o"), str(bad))
    assert "1 invalid json, 1 missing keys" in line and not (tmp_path / "o").exists()


def test_help_texts():
    runner = CliRunner()
    demo = runner.invoke(TOOLS["glm2-demo"], ["--help"]).output
    assert "synthesize" in demo and "parity" in demo
    usage = runner.invoke(TOOLS["glm2-eval"], ["--help"]).output
    assert "glm2-eval MODEL_DIR --data FILE" in usage and "glm2-eval score FILE" in usage
    by_name = dict(commands())
    preset = flags(by_name["glm2-convert synth"])["--preset"].help
    assert "6b (28 layers, hidden 4096, 6,244M parameters)" in preset and "tiny (2 layers" in preset
    merge = by_name["glm2-convert merge-lora"]
    texts = [merge.help] + [o.help for o in options_of(merge)]
    assert not [t for t in texts if "SRC" in t] and "BASE" in flags(merge)["--config"].help
    assert flags(merge)["--rearranged-rope"].help.startswith("BASE has")

def test_old_spellings_are_hidden_aliases_that_warn(tmp_path, capsys):
    """Each old spelling still works and says, in one line on stderr, that it is one (once however often given);
    the new spellings say nothing."""
    def params(tool, *args):
        cmd = dict(commands())[tool]
        with cmd.make_context(tool, [str(a) for a in args]) as ctx:
            return ctx.params

    def warned(old, new):
        assert capsys.readouterr().err == f"warning: {old} is an old spelling of {new}, and will be removed\n"

    assert params("glm2-convert ms2hf", "a", "b", "--target", "glm")["layout"] == "glm"
    warned("--target", "--layout")
    assert params("glm2-convert merge-lora", "a", "b", "c", "--hf=chatglm")["layout"] == "chatglm"
    warned("--hf", "--layout")
    assert params("glm2-merge-shards", "a", "b", "--strategy", tmp_path, "--to", "hf")["layout"] == "chatglm"
    warned("--to", "--layout")
    assert params("glm2-merge-shards", "a", "b", "--strategy", tmp_path, "--layout", "glm", "--to", "hf",
                  "--to", "ms")["layout"] == "glm"  # the new spelling wins
    warned("--to", "--layout")
    got = params("glm2-finetune", "--train-data", tmp_path, "--model", tmp_path, "--out", "o", "--config", tmp_path)
    assert got["model_dir"] == tmp_path and got["config_file"] == tmp_path
    assert capsys.readouterr().err.splitlines() == [
        "warning: --model is an old spelling of the positional argument, and will be removed",
        "warning: --config is an old spelling of --train-config, and will be removed"]
    assert params("glm2-eval", tmp_path, "--data", tmp_path, "--max-source-length", "9")["max_source_length"] == 9
    warned("--max-source-length", "--max-source-chars")
    assert params("glm2-convert ms2hf", "a", "b", "--layout", "glm")["layout"] == "glm"
    assert capsys.readouterr().err == ""
    assert unalias(["x", "--", "--target", "glm"], {"--target": "--layout"}) == ["x", "--", "--target", "glm"]


def test_an_allocation_that_fails_is_one_line(capsys):
    """MindSpore's "Memory not enough" and numpy's MemoryError end as one line, exit 1; other errors stay bugs."""
    def command(exc):
        @click.command(cls=Tool)
        def run():
            raise exc
        return run

    found = ("Memory not enough:#umsg#Memory isn't enough and alloc failed, kernel name: Cast-op36, "
             "alloc size: 224395264B.")
    for exc, line in [(RuntimeError(found), "error: out of memory: could not allocate 214 MiB more"),
                      (MemoryError("Unable to allocate 12.0 GiB"), "error: out of memory: could not allocate "
                                                                   "Unable to allocate 12.0 GiB")]:
        with pytest.raises(SystemExit) as end:
            command(exc).main([])
        err = capsys.readouterr().err
        assert end.value.code == 1 and err.startswith(line) and err.count("\n") == 1, err
    with pytest.raises(RuntimeError):
        command(RuntimeError("a bug")).main([])


def _baseline(cmd, tmp_path) -> list[str]:
    """Arguments that parse: every argument an existing path, every required option a value it takes."""
    data = str(DATA / "adgen_dev.json")
    args = []
    for p in cmd.params:
        if isinstance(p, click.Argument):
            args += [str(tmp_path)] * (2 if p.nargs == -1 else 1 if p.required else 0)
        elif p.required:
            args += [p.opts[0], data if isinstance(p.type, click.Path) else "x"]
    return args


def _bad_values(opt) -> list[str]:
    """A value of the wrong type and one out of range (or not among the choices, or a missing path)."""
    t = opt.type
    if isinstance(t, click.Choice):
        return ["no-such-choice"]
    if isinstance(t, click.Path):
        return ["/no/such/path"] if getattr(t, "exists", False) or type(t).__name__ == "ExistingPath" else []
    if isinstance(t, (click.IntRange, click.FloatRange)):
        out = [t.min - 1] if t.min is not None else []
        out += [t.max + 1] if t.max is not None else []
        return ["not-a-number", *map(str, out)]
    if t in (click.INT, click.FLOAT):
        raise AssertionError(f"{opt.opts[0]} is a number without a range")
    return []


def test_every_option_at_a_bad_value_is_one_line(tmp_path):
    """Each option of each command, at a value of the wrong type and at one out of its range, is refused in one
    line naming it, before the command runs; a numeric option without a declared range fails this test."""
    refused = 0
    for name, cmd in commands():
        base = _baseline(cmd, tmp_path)
        tool, *sub = name.split(" ")
        for opt in options_of(cmd):
            if opt.is_flag:
                continue
            try:
                values = _bad_values(opt)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None
            for value in values:  # a missing path is named itself, any other value by its option
                needle = value if value.startswith("/no/such") else opt.opts[0]
                one_error_line(invoke(tool, *sub, *base, opt.opts[0], value), needle)
                refused += 1
    assert refused > 60


def test_every_tool_tells_its_version():
    for tool in TOOLS:
        result = invoke(tool, "--version")
        assert result.exit_code == 0 and version("glm2-toolkit") in result.output, (tool, result.output)


def test_dtype_help_mentions_keep_only_where_it_is_a_choice():
    for name, cmd in commands():
        dtype = flags(cmd).get("--dtype")
        if dtype is not None:
            assert ("keep" in dtype.help) == ("keep" in dtype.type.choices), name
