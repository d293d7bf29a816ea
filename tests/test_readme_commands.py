"""Every command the READMEs show works: each is extracted, classified and checked.

Sources: ``README.md``, ``{pipelines,training,serving,cluster}/README.md`` and ``docs/*.md``:

- every line of a ```bash / ```sh fenced block (and of an untagged block, the lines that start with a
  program of :data:`PROGRAMS`), comments cut, ``\\``-continued lines joined (an indented line starting with
  ``[`` continues the command above it: usage notation), ``&&`` chains split, JSON output lines skipped;
- inline ```python ...``` / ```fdreamer ...``` / ```make ...``` spans, ```ray job submit ... -- CMD``` and
  ```serve run|deploy FILE```.

Usage notation is expanded before a check: an optional ``[--opt VALUE]`` group is tried without and with (all
groups at once), ``a|b|c`` and ``<a|b>`` alternatives one by one, placeholders (:data:`PLACEHOLDERS`) get
harmless values, and an unquoted ``...`` (the rest elided) makes the command *partial*: only what it shows is
checked (no unknown key, wrong type, bad value), not what a complete command also needs (a data path, ...).

Each command is in exactly one class (a command in none fails :func:`test_readme_command`, so a new README
command has to be classified here):

(a) ``run``: cheap and self-contained, run in this process as the user would (``fdreamer schedule``,
    ``fdreamer describe-model``, ``python -m fdreamer.schedule``, ``--help`` of any entry point);
(b) ``config``: a job that takes minutes is started through its own ``main`` with its real command line and
    stopped where it would start work: at ``cluster.connect.init_ray`` (training, studies), once
    ``PreprocessConfig`` is parsed (preprocessing: its manifests are not read), at the job function of a
    config-style command (``fdreamer generate|evaluate``, ``training/evaluate_job.py``) or when argparse has
    parsed the line (the other ``fdreamer`` subcommands, ``tests/bench/*``, ``cluster/main_job.py``). So the
    whole config is resolved the way the job resolves it (YAML with ``extends``, every override, types, the
    dataclass checks, ``check_ready``), and nothing runs;
(c) ``covered``: run by another test, named in :data:`COVERED` (the test node must exist); what can be
    checked without running still is: the Makefile target, ``ray job submit``'s options (Ray's own CLI parser)
    and its inner command as in (b), ``serve``'s options and the Serve config (Serve's schema and
    ``serving.settings.Settings``), a curl request's route and body (``serving.api`` routes,
    ``serving.request_parsing.parse_body``), ``cluster/local.sh``'s arguments;
(m) ``mention``: an inline span that only names an entry point (``fdreamer sample-data``, ``python
    training/run.py``): the script or subcommand exists.

:func:`test_readme_sample_config_error_is_real` checks the sample error message of README.md's
"Configuration" section against what ``training/run.py`` prints for ``--optim.lrr``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import re
import runpy
import shlex
import sys
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "pipelines/README.md", "training/README.md", "serving/README.md", "cluster/README.md",
        *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]

#: first words that make a line of an untagged fenced block a command
PROGRAMS = ("python", "python3", "fdreamer", "make", "ray", "serve", "curl", "export", "cluster/local.sh")

#: placeholder (a whole word, or the value of ``--key=VALUE``) -> a harmless value; {tmp}: the test's tmp dir
PLACEHOLDERS = {
    "DIR": "{tmp}/dir", "MODELS": "{tmp}/models", "PREPROCESSED": "{tmp}/preprocessed", "PRE": "{tmp}/pre",
    "PRE_IMAGES": "{tmp}/pre_images", "PREPROCESSED_IMAGES": "{tmp}/pre_images", "SAMPLE_DIR": "{tmp}/sample",
    "CKPT": "{tmp}/checkpoint", "DIR_OR_S3": "s3://bucket/features", "OUT.png": "{tmp}/out.png",
    "TEXT": "a red ball bounces left", "PNG": "{tmp}/first.png", "N": "4", "T": "8", "H": "64", "W": "64",
    "URI": "sqlite:///{tmp}/mlflow.db", "ID": "0123456789abcdef", "key=value": "optim.lr=1e-4",
}

#: what a partial command (one with ``...``) may still lack
INCOMPLETE = re.compile(r"missing required value|no input|no output folder|no training data|encoder path .* unset")

#: fdreamer subcommands that are cheap enough to run (class a)
RUN_SUBCOMMANDS = ("schedule", "describe-model")

#: class (c): (pattern on the command, where it is exercised: ``tests/file.py::test`` nodes or a note)
COVERED: list[tuple[str, str]] = [
    (r"make main-job$", "tests/test_e2e.py::test_main_job_end_to_end"),
    (r"make demo$", "tests/test_cli_demo.py::test_demo_end_to_end"),
    (r"make (test|test-fast)$", "the suite itself: .ci/run runs `make test` (CI)"),
    (r"make setup$", "every make target depends on it: tests/test_e2e.py::test_main_job_end_to_end (make main-job)"),
    (r"make gpu-check$", "tests/test_gpu_check.py::test_gpu_check_runs_on_cpu_at_the_tiny_preset (the same script with "
                         "--cpu --tiny; on a GPU machine: make gpu-check itself)"),
    (r"ray job submit .* -- .+", "tests/test_e2e.py::test_main_job_end_to_end, "
                                 "tests/test_local_cluster.py::test_local_cluster_lifecycle"),
    (r"serve (run|deploy) ", "tests/test_serving.py::test_config_yaml_is_a_valid_serve_config_and_builds (and serve.run "
                             "of the app in its server fixture), tests/test_e2e.py::test_main_job_end_to_end (serve deploy)"),
    (r"serve status$", "needs a running app; the app status it prints is what "
                       "tests/test_e2e.py::test_main_job_end_to_end polls (Serve's REST API)"),
    (r"cluster/local\.sh (up|down|status)\b", "tests/test_local_cluster.py::test_local_cluster_lifecycle"),
    (r"curl ", "tests/test_serving.py::test_t2v_and_i2v_produce_the_requested_mp4s, "
               "tests/test_serving.py::test_cancel_and_overload"),
    (r"python -m http\.server ", "Python's own file server for the sample web data; the job's http(s) inputs run "
                                "against a real loopback server in "
                                "tests/test_web_inputs.py::test_every_https_input_is_accounted_for_and_faults_get_their_reasons"),
    (r"(export )?[A-Z_][A-Z0-9_]*=", "shell set-up for the commands after it (the serve config is checked with "
                                     "them)"),
]


# ----------------------------------------------------------------------------------------- extraction


@dataclasses.dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str
    fenced: bool
    env: tuple[tuple[str, str], ...] = ()  # exports of the fenced block above this command

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{self.text[:60]}"


def _unquoted_spans(s: str) -> list[tuple[int, int]]:
    """(start, end) of the parts of ``s`` outside single and double quotes."""
    spans, start, quote, escaped = [], 0, "", False
    for i, ch in enumerate(s):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            if ch == quote:
                quote, start = "", i + 1
        elif ch in "'\"":
            spans.append((start, i))
            quote = ch
    if not quote:
        spans.append((start, len(s)))
    return spans


def _sub_unquoted(pattern: str, repl: str, s: str) -> str:
    out, last = [], 0
    for a, b in _unquoted_spans(s):
        out.append(s[last:a])
        out.append(re.sub(pattern, repl, s[a:b]))
        last = b
    out.append(s[last:])
    return "".join(out)


def _strip_comment(line: str) -> str:
    for a, b in _unquoted_spans(line):
        for m in re.finditer("#", line[a:b]):
            at = a + m.start()
            if at == 0 or line[at - 1].isspace():  # a word starting with #
                return line[:at].rstrip()
    return line.rstrip()


def _split_chain(text: str) -> list[str]:
    marked = _sub_unquoted(r"\s&&\s", "\0", text)
    return [part.strip() for part in marked.split("\0") if part.strip()]


def fenced_commands(doc: str, text: str) -> list[Command]:
    out: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"\s*```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        lang, body = m.group(1), []
        i += 1
        while i < len(lines) and not re.match(r"\s*```\s*$", lines[i]):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        if lang not in ("bash", "sh", "shell", ""):
            continue
        logical: list[list] = []  # [line, text]
        continued = False
        for n, raw in body:
            stripped = _strip_comment(raw).strip()
            if continued and logical:
                logical[-1][1] += " " + stripped
            elif raw[:1].isspace() and stripped.startswith("[") and logical:
                logical[-1][1] += " " + stripped  # usage notation: optional options on the next line
            elif stripped:
                logical.append([n, stripped])
            continued = stripped.endswith("\\")
            if continued:
                logical[-1][1] = logical[-1][1][:-1].rstrip()
        env: list[tuple[str, str]] = []
        for n, cmd in logical:
            if cmd.startswith("{"):
                continue  # a command's JSON output
            if not lang and cmd.split()[0] not in PROGRAMS:
                continue  # an untagged block: a diagram, output
            for part in _split_chain(cmd):
                out.append(Command(doc, n, part, True, tuple(env)))
                words = shlex.split(part)
                words = words[1:] if words[:1] == ["export"] else words
                if len(words) == 1 and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                    env.append(tuple(words[0].split("=", 1)))
    return out


INLINE = re.compile(r"(python3?|fdreamer|make) .*|ray job submit .* -- .+|serve (run|deploy) \S+\.yaml.*")


def inline_spans(text: str) -> list[tuple[int, str]]:
    """(line, text) of every single-backtick span outside fenced blocks, whitespace joined."""
    prose, fenced = [], False
    for raw in text.splitlines():
        if re.match(r"\s*```", raw):
            fenced = not fenced
            prose.append("")
        else:
            prose.append("" if fenced else raw)
    joined = "\n".join(prose)
    return [(joined.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
            for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", joined)]


def inline_commands(doc: str, text: str) -> list[Command]:
    return [Command(doc, n, s.replace("\\|", "|"), False) for n, s in inline_spans(text)
            if INLINE.fullmatch(s.replace("\\|", "|"))]


def all_commands() -> list[Command]:
    out: list[Command] = []
    for doc in DOCS:
        text = (REPO / doc).read_text()
        out += fenced_commands(doc, text) + inline_commands(doc, text)
    return out


# ----------------------------------------------------------------------------------------- usage notation


def _optional_groups(s: str) -> list[tuple[int, int]]:
    """Top-level ``[...]`` groups of optional arguments: unquoted, after a space, holding options
    (``[--rows [a,e]]``, ``[key=value ...]``), not a list value (``--rows [a,e]``)."""
    quoted = [True] * len(s)
    for a, b in _unquoted_spans(s):
        quoted[a:b] = [False] * (b - a)
    groups, depth, start = [], 0, -1
    for i, ch in enumerate(s):
        if quoted[i]:
            continue
        if ch == "[":
            if depth == 0 and (i == 0 or s[i - 1].isspace()):
                start = i
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
            if depth == 0 and start >= 0:
                inner = s[start + 1:i].strip()
                if inner.startswith("-") or "=" in inner or "..." in inner:
                    groups.append((start, i))
                start = -1
    return groups


ELISION = r"(?<![^\s\[])\.\.\.(?![^\s\]])"  # an unquoted "..." word (also "[x ...]")


def is_partial(text: str) -> bool:
    without = text
    for a, b in reversed(_optional_groups(text)):
        without = without[:a] + without[b + 1:]
    return "\0" in _sub_unquoted(ELISION, "\0", without)


def _with_and_without(text: str) -> tuple[str, str]:
    """``text`` with every optional group left out, and with every one given (elisions dropped)."""
    text = _sub_unquoted(ELISION, " ", text)
    without, with_all = text, text
    for a, b in reversed(_optional_groups(text)):
        without = without[:a] + without[b + 1:]
        with_all = with_all[:a] + with_all[a + 1:b] + with_all[b + 1:]
    return without, with_all


def with_options(text: str) -> str:
    """The command as the shell gets it with every optional group given."""
    return _with_and_without(text)[1]


def expand(text: str, tmp: Path) -> list[list[str]]:
    """The argument lists a usage line stands for (see the module docstring)."""
    without, with_all = _with_and_without(text)
    variants: list[list[str]] = []
    for line in dict.fromkeys([without, with_all]):
        tokens = [_placeholder(t, tmp) for t in shlex.split(line)]
        alts = [_alternatives(t) for t in tokens]
        for k in range(max(len(a) for a in alts)):
            v = [a[min(k, len(a) - 1)] for a in alts]
            if v not in variants:
                variants.append(v)
    return variants


def _alternatives(token: str) -> list[str]:
    m = re.search(r"<([^<>|]+(?:\|[^<>|]+)+)>", token)
    if m:
        return [token[:m.start()] + alt + token[m.end():] for alt in m.group(1).split("|")]
    if " " not in token and re.fullmatch(r"[^|]+(\|[^|]+)+", token):
        key, eq, value = token.rpartition("=") if token.startswith("--") else ("", "", token)
        return [key + eq + alt for alt in value.split("|")]
    return [token]


def _placeholder(token: str, tmp: Path) -> str:
    if token in PLACEHOLDERS:
        return PLACEHOLDERS[token].format(tmp=tmp)
    key, eq, value = token.partition("=")
    if token.startswith("--") and eq and value in PLACEHOLDERS:
        return key + "=" + PLACEHOLDERS[value].format(tmp=tmp)
    return token


# ----------------------------------------------------------------------------------------- invoking entry points


class Reached(BaseException):
    """The job got through its command line to where it would start work (a BaseException: no job's
    ``except`` catches it)."""


def _entry(tokens: list[str]) -> tuple[Callable[[list[str]], Any], list[str], str]:
    """(the entry point's main, its arguments, argv[0])."""
    prog = tokens[0]
    if prog in ("python", "python3") and tokens[1] == "-m":
        module = tokens[2]

        def run_module(argv: list[str]) -> Any:
            with warnings.catch_warnings():  # "found in sys.modules ... prior to execution": imported by others
                warnings.simplefilter("ignore", RuntimeWarning)
                return runpy.run_module(module, run_name="__main__", alter_sys=True)

        return run_module, tokens[3:], module
    if prog in ("python", "python3"):
        script = tokens[1]
        path = REPO / script
        assert path.is_file(), f"{script}: no such file"
        if script.startswith("tests/"):
            assert "ArgumentParser" in path.read_text(), f"{script}: no argparse, so it cannot be stopped after parsing"
            spec = importlib.util.spec_from_file_location(f"_readme_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
        return module.main, tokens[2:], script
    if prog == "fdreamer":
        from fdreamer.cli.main import main

        return main, tokens[1:], prog
    if prog == "cluster/local.sh":
        from cluster.local import main

        return main, tokens[1:], prog
    raise AssertionError(f"no entry point for {prog!r}")


def _call(main: Callable, argv: list[str]) -> Any:
    return main(argv) if inspect.signature(main).parameters else main()


@dataclasses.dataclass
class Outcome:
    rc: int | None  # None: Reached (stopped before the work)
    out: str
    err: str
    records: list[Any]  # configs / argparse results seen on the way

    def failure(self, what: str) -> str:
        return f"{what}: exit {self.rc}\n{self.err[-3000:] or self.out[-3000:]}"


def invoke(tokens: list[str], *, stop: bool = False, partial: bool = False) -> Outcome:
    """Run the entry point of ``tokens`` in this process from the repo root (``stop``: with the hooks that
    halt it where its work would begin)."""
    out, err, records = io.StringIO(), io.StringIO(), []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        mp.setattr(sys, "path", list(sys.path))
        main, argv, argv0 = _entry(tokens)
        mp.setattr(sys, "argv", [argv0, *argv])
        if stop:
            _install_stops(mp, records, partial)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = int(_call(main, argv) or 0)
            except Reached:
                rc = None
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
    return Outcome(rc, out.getvalue(), err.getvalue(), records)


def _install_stops(mp: pytest.MonkeyPatch, records: list[Any], partial: bool) -> None:
    import cluster.connect
    import fdreamer.cli.config_command as config_command
    import fdreamer.config
    import training.launch

    def init_ray(*args: Any, **kwargs: Any) -> None:
        raise Reached("init_ray")

    def prepare(cfg: Any) -> dict:  # training.launch.prepare without reading data or checkpoints
        records.append(cfg)
        if not partial:
            cfg.check_ready()
        cfg.unet_kwargs()
        return {}

    real_parse_cli = fdreamer.config.parse_cli

    def parse_cli(cls: type, argv: list[str], prog: str = "") -> Any:
        cfg, path = real_parse_cli(cls, argv, prog)
        records.append(cfg)
        if cls.__name__ == "PreprocessConfig":  # next the job reads the manifests: stop here
            raise Reached("preprocess config")
        return cfg, path

    real_run_command = config_command.run_command

    def run_command(cls: type, run: Callable, argv: list[str], prog: str) -> int:
        def job(cfg: Any) -> int:
            records.append(cfg)
            raise Reached(cls.__name__)

        return real_run_command(cls, job, argv, prog)

    real_parse_args = argparse.ArgumentParser.parse_args
    real_parse_known = argparse.ArgumentParser.parse_known_args
    inside = [False]

    def parse_known_args(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        if inside[0]:  # a subparser, or parse_args' own call
            return real_parse_known(self, args, namespace)
        inside[0] = True
        try:
            ns, extras = real_parse_known(self, args, namespace)
        finally:
            inside[0] = False
        records.append((ns, extras))
        raise Reached("argparse")

    def parse_args(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        if inside[0]:
            return real_parse_args(self, args, namespace)
        inside[0] = True
        try:
            ns = real_parse_args(self, args, namespace)
        finally:
            inside[0] = False
        records.append((ns, []))
        raise Reached("argparse")

    mp.setattr(training.launch, "prepare", prepare)
    mp.setattr(cluster.connect, "init_ray", init_ray)
    mp.setattr(fdreamer.config, "parse_cli", parse_cli)
    mp.setattr(config_command, "run_command", run_command)
    mp.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    mp.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)


# ----------------------------------------------------------------------------------------- the checks


@dataclasses.dataclass
class Ctx:
    cmd: Command
    tmp: Path
    partial: bool


def check_run(tokens: list[str], ctx: Ctx) -> None:
    """(a) run it; it has to exit 0 and print something (a ``--plot`` file has to appear)."""
    result = invoke(tokens)
    assert result.rc == 0, result.failure(" ".join(tokens))
    assert result.out.strip(), f"{' '.join(tokens)}: printed nothing"
    if "--help" in tokens:
        assert "usage" in result.out.lower(), result.out[:500]
    if "--plot" in tokens:
        plot = Path(tokens[tokens.index("--plot") + 1])
        assert plot.is_file() and plot.stat().st_size > 0, f"{plot} not written"


def check_config(tokens: list[str], ctx: Ctx) -> None:
    """(b) the job's own command-line parsing and config resolution, stopped before any work."""
    result = invoke(tokens, stop=True, partial=ctx.partial)
    if result.rc is not None:
        if ctx.partial and INCOMPLETE.search(result.err):
            return  # what the elided part of the command would give
        raise AssertionError(result.failure(f"{' '.join(tokens)} did not get past its checks"))
    assert result.records, f"{' '.join(tokens)}: stopped before reading its command line"
    for rec in result.records:
        _check_record(rec, ctx)


def _check_record(rec: Any, ctx: Ctx) -> None:
    from fdreamer.config import load_config

    if isinstance(rec, tuple):  # argparse
        ns, extras = rec
        if extras:  # benches that pass extra overrides on to the training config
            assert hasattr(ns, "config"), f"unrecognized arguments: {extras}"
            from training.config import TrainConfig

            load_config(TrainConfig, ns.config, extras)
        if hasattr(ns, "func"):
            assert callable(ns.func)
        return
    name = type(rec).__name__
    if name == "PreprocessConfig" and not ctx.partial:  # what preprocess.py checks before reading manifests
        from fdreamer.data import storage

        rec.check_ready()
        storage.resolve(rec.output, rec.s3_endpoint)
    if name == "GenerateConfig":
        from fdreamer.inference.request import video_format

        video_format(rec.out)


def check_mention(tokens: list[str], ctx: Ctx) -> None:
    """(m) the named entry point exists."""
    if tokens[0] == "fdreamer":
        from fdreamer.cli.main import build_parser

        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        assert tokens[1] in sub.choices, f"no subcommand fdreamer {tokens[1]}"
    elif tokens[1] != "-c":
        assert (REPO / tokens[1]).is_file(), f"{tokens[1]}: no such file"


def check_make(tokens: list[str], ctx: Ctx) -> None:
    makefile = (REPO / "Makefile").read_text()
    for target in tokens[1:]:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"the Makefile has no target {target!r}"


def check_ray_job_submit(tokens: list[str], ctx: Ctx) -> None:
    """Ray's own parser takes the options; the entrypoint after ``--`` is checked as in (b)."""
    from ray.dashboard.modules.job.cli import job_cli_group

    assert tokens[:3] == ["ray", "job", "submit"], tokens
    ctx_ = job_cli_group.commands["submit"].make_context("submit", tokens[3:])
    inner = list(ctx_.params["entrypoint"])
    _dispatch(inner, ctx)


def check_serve(tokens: list[str], ctx: Ctx) -> None:
    """Serve's own parser takes the options; the config passes Serve's schema and the app's settings."""
    import yaml
    from ray.serve.schema import ServeDeploySchema
    from ray.serve.scripts import cli

    from serving.settings import Settings

    name = tokens[1]
    params = cli.commands[name].make_context(name, tokens[2:]).params
    config = params.get("config_or_import_path")
    if config:
        raw = yaml.safe_load((REPO / config).read_text())
        ServeDeploySchema.model_validate(raw)
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(REPO)
            for key, value in ctx.cmd.env:
                if key.startswith(("FDREAMER_", "MLFLOW_")):
                    mp.setenv(key, value)
            for app in raw["applications"]:
                Settings.from_args(app.get("args"))


def check_local_sh(tokens: list[str], ctx: Ctx) -> None:
    result = invoke(tokens, stop=True)
    assert result.rc is None and result.records, result.failure(" ".join(tokens))


def check_env(tokens: list[str], ctx: Ctx) -> None:
    assert re.match(r"(export )?[A-Z_][A-Z0-9_]*=\S", ctx.cmd.text), f"not a variable assignment: {ctx.cmd.text}"


def check_http_server(tokens: list[str], ctx: Ctx) -> None:
    """``python -m http.server PORT --bind ADDR --directory DIR [&]``: its options are the module's own."""
    args = [t for t in tokens[3:] if t != "&"]
    import http.server  # noqa: F401 - the module the command runs exists in this Python

    assert args and args[0].isdigit() and set(args[1::2]) <= {"--bind", "--directory"}, f"unexpected options {args}"


def _tiny_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def check_curl(tokens: list[str], ctx: Ctx) -> None:
    """The URL is a route of ``serving.api``; a request body parses as the server parses it."""
    from starlette.routing import Match

    from serving.api import app
    from serving.request_parsing import parse_body

    method, url, headers, data, form = "GET", None, {}, None, []
    it = iter(tokens[1:])
    for tok in it:
        if tok in ("-s", "-sS", "-f"):
            continue
        if tok == "-H":
            key, _, value = next(it).partition(":")
            headers[key.strip().lower()] = value.strip()
        elif tok == "-X":
            method = next(it)
        elif tok == "-d":
            data, method = next(it), "POST" if method == "GET" else method
        elif tok == "-F":
            form.append(next(it))
            method = "POST" if method == "GET" else method
        elif tok == "-o":
            next(it)
        elif tok.startswith("http"):
            url = tok
        else:
            raise AssertionError(f"curl option {tok!r} not understood by this test")
    assert url, "no URL"
    path = re.sub(r"^https?://[^/]+", "", url).split("?")[0].replace("<id>", "0" * 32)
    scope = {"type": "http", "path": path, "method": method}
    assert any(r.matches(scope)[0] == Match.FULL for r in app.routes), f"{method} {path}: no such route"
    png = _tiny_png()
    if data is not None:
        body = data.replace("$(base64 -w0 first.png)", base64.b64encode(png).decode()).encode()
        parse_body(headers.get("content-type", "application/x-www-form-urlencoded"), body)
    if form:
        boundary, parts = "readme-boundary", []
        for item in form:
            key, _, value = item.partition("=")
            if value.startswith("@"):
                head = f'Content-Disposition: form-data; name="{key}"; filename="{value[1:]}"\r\n' \
                       "Content-Type: image/png\r\n\r\n"
                parts.append(head.encode() + png)
            else:
                parts.append(f'Content-Disposition: form-data; name="{key}"\r\n\r\n{value}'.encode())
        body = b"".join(f"--{boundary}\r\n".encode() + p + b"\r\n" for p in parts) + f"--{boundary}--\r\n".encode()
        parse_body(f"multipart/form-data; boundary={boundary}", body)


def _dispatch(tokens: list[str], ctx: Ctx) -> None:
    kind, _, check = classify_tokens(tokens)
    assert check is not None, f"unclassified command: {' '.join(tokens)}"
    check(tokens, ctx)


def is_mention(cmd: Command) -> bool:
    """An inline span naming an entry point without arguments (``fdreamer sample-data``, ``python -c``)."""
    words = cmd.text.split()
    return (not cmd.fenced and len(words) == 2 and words[0] in ("python", "python3", "fdreamer")
            and words[1] not in RUN_SUBCOMMANDS)


def classify_tokens(tokens: list[str], mention: bool = False) -> tuple[str, str, Callable | None]:
    """(class, why, check) of one expanded command."""
    text = " ".join(tokens)
    prog = tokens[0]
    if mention:
        return "mention", "names an entry point", check_mention
    for pattern, where in COVERED:
        if re.match(pattern, text):
            check = {"make": check_make, "ray": check_ray_job_submit, "serve": check_serve, "curl": check_curl,
                     "cluster/local.sh": check_local_sh,
                     "python": check_http_server}.get(prog, check_env)
            return "covered", where, check
    if "--help" in tokens or "-h" in tokens:
        return "run", "--help", check_run
    if prog == "fdreamer" and tokens[1] in RUN_SUBCOMMANDS:
        return "run", "seconds, no files but the plot", check_run
    if prog in ("python", "python3") and tokens[1:3] == ["-m", "cluster.checks"]:
        return "run", "seconds, reads the committed configs", check_run
    if prog in ("python", "python3") and tokens[1:3] == ["-m", "fdreamer.schedule"]:
        return "run", "seconds, writes the plot", check_run
    if prog in ("python", "python3") and tokens[1:3] == ["-m", "serving.settings"]:
        return "run", "seconds, reads the Serve config", check_run
    if prog == "fdreamer" or (prog in ("python", "python3") and re.fullmatch(
            r"(training/(run|ablate|compare|evaluate_job)|pipelines/preprocess|cluster/main_job|tests/bench/\w+)\.py",
            tokens[1] if len(tokens) > 1 else "")):
        return "config", "a job: parsed and resolved, not run", check_config
    return "", "", None


# ----------------------------------------------------------------------------------------- tests

COMMANDS = all_commands()


@pytest.fixture(scope="module", autouse=True)
def _describe_once() -> Any:
    """``fdreamer describe-model`` builds the sd15 model on the meta device: once per argument set."""
    import fdreamer.cli.describe as describe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(describe, "describe", cache(describe.describe))
        yield


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command(cmd: Command, tmp_path: Path) -> None:
    words = with_options(cmd.text)
    for a, b in _unquoted_spans(words):
        assert not re.search(r"[][]", words[a:b]), (
            f"{cmd.id}: quote the list value (--key='[a, b]'): unquoted, the shell takes [...] for a glob pattern "
            f"(zsh stops on 'no matches found'): {words}")
    ctx = Ctx(cmd, tmp_path, is_partial(cmd.text))
    for tokens in expand(cmd.text, tmp_path):
        while len(tokens) > 1 and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
            tokens = tokens[1:]  # VAR=value before a command: the command is checked
        kind, why, check = classify_tokens(tokens, is_mention(cmd))
        assert check is not None, (
            f"{cmd.id}: a README command in no class; add a rule to tests/test_readme_commands.py "
            f"(run it, resolve its config, or name the test that covers it in COVERED): {' '.join(tokens)}")
        try:
            check(tokens, ctx)
        except AssertionError as exc:
            raise AssertionError(f"{cmd.doc}:{cmd.line}: {' '.join(tokens)}\n{exc}") from None
        except Exception as exc:  # a config error raised by a check itself
            raise AssertionError(f"{cmd.doc}:{cmd.line}: {' '.join(tokens)}\n{type(exc).__name__}: {exc}") from None


def test_extraction_finds_the_commands() -> None:
    """The extractor sees what it should (an extractor that finds nothing would pass everything)."""
    texts = {c.text for c in COMMANDS}
    assert all((REPO / d).is_file() for d in DOCS)
    assert {c.doc for c in COMMANDS} >= {"README.md", "pipelines/README.md", "training/README.md",
                                        "serving/README.md", "cluster/README.md", "docs/results.md"}
    assert any(t.startswith("python training/run.py --config training/configs/stage1.yaml --optim.lr=") for t in texts)
    assert "make main-job" in texts and "serve status" in texts
    assert any(t.startswith("fdreamer evaluate --checkpoint runs/learn/train/tiny_learn [--data") for t in texts)
    assert not any(t.startswith(("{", "HTTP", "[")) for t in texts)
    assert len(COMMANDS) > 80, len(COMMANDS)


def test_usage_notation() -> None:
    tmp = Path("/t")
    assert expand("fdreamer x [--a [1,2]] [--b B] --c i2v|t2v", tmp) == [
        ["fdreamer", "x", "--c", "i2v"], ["fdreamer", "x", "--c", "t2v"],
        ["fdreamer", "x", "--a", "[1,2]", "--b", "B", "--c", "i2v"],
        ["fdreamer", "x", "--a", "[1,2]", "--b", "B", "--c", "t2v"]]
    assert expand("python p.py --config c/<a|b>.yaml --inputs='[...]' --out=DIR ...", tmp) == [
        ["python", "p.py", "--config", "c/a.yaml", "--inputs=[...]", "--out=/t/dir"],
        ["python", "p.py", "--config", "c/b.yaml", "--inputs=[...]", "--out=/t/dir"]]
    assert is_partial("python training/run.py ...") and not is_partial('fdreamer generate --prompt "..."')
    assert not is_partial("python x.py [key=value ...]")
    assert _optional_groups("--rows [a,e]") == []


@pytest.mark.parametrize("pattern, where", COVERED)
def test_covered_commands_name_real_tests(pattern: str, where: str) -> None:
    for node in re.findall(r"(tests/\w+\.py)::(\w+)", where):
        path, name = node
        assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{path}::{name} does not exist"


def test_readme_sample_config_error_is_real() -> None:
    """README.md, "Configuration": the sample message is what ``training/run.py`` prints for ``--optim.lrr``
    (shortened only with ``...``)."""
    section = (REPO / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    samples = [s for _, s in inline_spans(section) if "unknown key" in s]
    assert len(samples) == 1, samples
    sample = samples[0]
    override = re.search(r"'(--optim\.lrr=[^']*)'", sample)
    assert override, f"the sample should name the override it comes from: {sample}"
    result = invoke(["python", "training/run.py", "--config", "training/configs/stage1.yaml", override.group(1)],
                    stop=True)
    assert result.rc == 2, result.failure("--optim.lrr")
    printed = [line for line in result.err.splitlines() if "unknown key" in line]
    assert len(printed) == 1, result.err
    pattern = ".*".join(re.escape(part) for part in sample.split("..."))
    assert re.fullmatch(pattern, printed[0]), f"README:\n  {sample}\nprinted:\n  {printed[0]}"
