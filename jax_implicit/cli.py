"""One command line for every command: `python -m jax_implicit.X [--config=FILE[:ARG]] [--config.KEY=VALUE ...]`.

Settings are ml_collections config files (configs/). `--help` lists every setting of the chosen config
with its default and the one-line description written beside it in the code that builds the config
(a trailing `# ...` comment, or a "`key`: ..." line of a docstring), so help is generated, never written
twice. An unknown or misspelled key, a value of the wrong type or a stray argument is a one-line error
with close matches and exit status 2, before any model work; errors the command raises for bad input
(ValueError, OSError) are one line with exit status 1 (set JAX_IMPLICIT_TRACEBACK=1 for the traceback).
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from ml_collections import ConfigDict

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(__file__).resolve().parent
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class UsageError(ValueError):
    """A command line that names no real setting or gives it a value of the wrong type."""


# ----------------------------------------------------------------------------- config files


def config_path(spec: str) -> tuple[Path, str | None]:
    """`FILE[:ARG]` as (an existing path, the argument); a relative FILE is tried in the cwd, then the checkout."""
    file, sep, arg = spec.partition(":")
    path = Path(file)
    if not path.is_file() and not path.is_absolute() and (ROOT / path).is_file():
        path = ROOT / path
    if not path.is_file():
        raise UsageError(f"--config={spec}: config file {file} does not exist")
    return path, (arg if sep else None)


def load(spec: str) -> ConfigDict:
    """The config `--config=FILE[:ARG]` names; a bad ARG is the config file's own one-line error."""
    from jax_implicit import files

    path, arg = config_path(spec)
    try:
        return files.load_config_file(path, arg)
    except ValueError as e:
        raise UsageError(f"--config={spec}: {e}") from None


def flat(cfg: ConfigDict, prefix: str = "") -> dict[str, Any]:
    """Every leaf setting as {"a.b.c": value}."""
    out = {}
    for key, value in cfg.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, ConfigDict) else {f"{prefix}{key}": value})
    return out


def unknown_key(key: str, known: list[str]) -> str:
    """The message for a key the config lacks, with its close matches."""
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    close = close or [k for k in known if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    hint = f"; close matches: {', '.join(close)}" if close else "; --help lists the settings"
    return f"unknown setting {key!r}{hint}"


def parse_value(key: str, text: str, default: Any) -> Any:
    """`text` as the type of the setting's default."""
    kind = type(default)
    try:
        if isinstance(default, bool):
            if text.lower() not in TRUE + FALSE:
                raise ValueError
            return text.lower() in TRUE
        if isinstance(default, (int, float)):
            return kind(float(text)) if kind is int and re.fullmatch(r"-?\d+(\.0*)?", text) else kind(text)
        if isinstance(default, (tuple, list)):
            if text.strip()[:1] in "([":
                value = ast.literal_eval(text)
            else:
                item = type(default[0]) if default else str
                value = [parse_value(key, part.strip(), item()) for part in text.split(",") if part.strip()]
            return kind(value)
        if default is None:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
        return text
    except (ValueError, SyntaxError, TypeError):
        raise UsageError(f"--config.{key}={text!r}: expected {kind.__name__} (default {default!r})") from None


def apply_overrides(cfg: ConfigDict, overrides: list[tuple[str, str]]) -> ConfigDict:
    """Set each `key=value`, checking the key exists and parsing the value as its default's type."""
    known = flat(cfg)
    sections = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    for key, text in overrides:
        if key in sections:
            raise UsageError(f"--config.{key} is a section; set its keys, e.g. --config.{key}.<key>=...")
        if key not in known:
            raise UsageError(unknown_key(key, sorted(known)))
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        with node.unlocked():
            node[leaf] = parse_value(key, text, known[key])
    return cfg


# ----------------------------------------------------------------------------- help


def _imported_modules(path: Path) -> list[Path]:
    """The project modules a source file imports (`from jax_implicit import x`, `from jax_implicit.x import y`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jax_implicit"):
            base = PACKAGE.joinpath(*node.module.split(".")[1:])
            names = [base / f"{a.name}.py" for a in node.names] + [base.with_suffix(".py")]
            found += [p for p in names if p.is_file()]
    return found


def descriptions(config_file: Path) -> Callable[[str], str]:
    """A lookup from a setting ("a.b.c") to the trailing `# ...` comment beside its value, in the config file
    or the project modules it imports (two levels deep).

    A comment inside `name=dict(...)` or `c.name = ConfigDict(dict(...))` is filed under that section, and
    one inside `def name(...)` / `def name_config(...)` (`default_config` in module `name`; `get_config` is the
    root) under `name`, so
    equal key names in different sections keep their own text; otherwise a bare key name is looked up only
    when a single comment anywhere describes it."""
    files, frontier = [config_file], [config_file]
    for _ in range(2):
        frontier = [m for f in frontier for m in _imported_modules(f) if m not in files and m != Path(__file__)]
        files += frontier
    full: dict[str, str] = {}
    bare: dict[str, set[str]] = {}
    for file in files:
        sections: list[tuple[str, int]] = []  # (section name, bracket depth inside it)
        depth, function = 0, ""
        for line in file.read_text().splitlines():
            code, _, comment = line.partition("  # ")
            if code[:1].strip():  # a top-level line: the section of a function body ends here
                named = re.match(r"def (\w+)\(", code)
                function = named.group(1).removesuffix("_config") if named else ""
                function = {"default": file.stem, "get": ""}.get(function, function)  # get_config: the root
            key = re.match(r"\s*(?:\w+\.)?(\w+)\s*=(?!=)", code)
            if key and comment and not code.lstrip().startswith(("def ", "class ")):
                path = [function] * bool(function) + [s for s, _ in sections] + [key.group(1)]
                full.setdefault(".".join(path), comment.strip())
                bare.setdefault(key.group(1), set()).add(comment.strip())
            if opened := re.match(r"\s*(?:\w+\.)?(\w+)\s*=\s*(?:ConfigDict\()?dict\(", code):
                sections.append((opened.group(1), depth + 1))
            depth += sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
            while sections and depth < sections[-1][1]:
                sections.pop()

    def lookup(setting: str) -> str:
        parts = setting.split(".")
        for i in range(len(parts) - 1):  # the longest known tail with at least its section
            if (tail := ".".join(parts[i:])) in full:
                return full[tail]
        found = bare.get(parts[-1], set())
        return next(iter(found)) if len(found) == 1 else ""

    return lookup


def help_text(module: str, doc: str, spec: str, cfg: ConfigDict) -> str:
    lines = [f"usage: python -m {module} --config=FILE[:ARG] [--config.KEY=VALUE ...]", "",
             (doc or "").strip().split("\n\n")[0], ""]
    if not spec:
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.py"))
        return "\n".join(lines + ["config files (--config=FILE --help lists a file's settings):", *files])
    path, _ = config_path(spec)
    about = descriptions(path)
    lines.append(f"settings of --config={spec} (default value, description):")
    settings = flat(cfg)
    width = min(max(len(k) + len(repr(v)) for k, v in settings.items()) + 12, 64)
    for key, value in settings.items():
        left = f"  --config.{key}={value!r}"
        about_key = about(key)
        lines.append(f"{left:<{width}} {about_key}".rstrip() if len(left) < width else f"{left}\n{'':<{width}} {about_key}".rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point


def parse(argv: list[str], default_config: str | None, extra: dict | None = None) -> tuple[str, ConfigDict, bool]:
    """(config spec, config with overrides applied, whether help was asked for)."""
    spec, overrides, want_help = default_config, [], False
    for arg in argv:
        if arg in ("-h", "--help", "-help", "--helpfull"):
            want_help = True
        elif arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg.startswith("--config.") and "=" in arg:
            key, value = arg[len("--config."):].split("=", 1)
            overrides.append((key, value))
        else:
            raise UsageError(f"unexpected argument {arg!r}; settings go in --config.KEY=VALUE (--help lists them)")
    if spec is None and want_help:
        return "", ConfigDict(), True
    if spec is None:
        raise UsageError("give a config: --config=FILE[:ARG] (configs/ holds them; --help lists them)")
    cfg = load(spec)
    if extra:
        with cfg.unlocked():
            for key, value in extra.items():
                if key not in cfg:
                    cfg[key] = value
    return spec, (cfg if want_help else apply_overrides(cfg, overrides)), want_help


def quiet() -> None:
    """No chatter on every run: the pkg_resources deprecation (alpaca_eval's setuptools) and the log lines
    about accelerator backends that are absent. libtpu (installed for the compile check) prints warnings
    from C++ whenever JAX starts its TPU backend on a machine without a TPU, so on a machine with neither a
    TPU nor an NVIDIA device, JAX runs on the CPU alone unless $JAX_PLATFORMS says otherwise."""
    import glob
    import logging
    import warnings

    if not os.environ.get("JAX_PLATFORMS") and not glob.glob("/dev/accel*") + glob.glob("/dev/vfio/*") + \
            glob.glob("/dev/nvidia[0-9]*"):
        os.environ["JAX_PLATFORMS"] = "cpu"
        if "jax" in sys.modules:  # imported but not yet started: its backends start on first use
            sys.modules["jax"].config.update("jax_platforms", "cpu")

    warnings.filterwarnings("ignore", message=r".*pkg_resources is deprecated.*")
    for name in ("jax._src.xla_bridge", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def persistent_cache() -> None:
    """Keep compiled programs between runs: a sweep compiles the same shapes for every model it trains and
    evaluates, and the evaluation's decoder alone takes about a minute to compile on two CPU cores. The cache
    lives in $JAX_COMPILATION_CACHE_DIR when that is set (JAX reads it), else in `.jax_cache/` of the checkout;
    programs that compile in under a second are not kept (JAX's default)."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(ROOT / ".jax_cache"))


def main(run: Callable[[ConfigDict], Any], default_config: str | None, *, extra: dict | None = None,
         errors: tuple[type[Exception], ...] = (), check: Callable[[ConfigDict], None] | None = None,
         argv: list[str] | None = None) -> None:
    """Parse the command line, then `run(config)`; print what it returns (a path, text or a dict).

    `extra`: settings added to whatever config is loaded (the planner's hardware on a training config);
    `errors`: the command's own exception types that report bad input or a stopped run, besides ValueError
    and OSError; `check`: the command's own validation of a whole config, also run alone when
    $JAX_IMPLICIT_CHECK_ONLY is set (the launch scripts' --dry-run checks a remote command that way)."""
    module = sys.modules["__main__"].__spec__.name if getattr(sys.modules["__main__"], "__spec__", None) else "?"
    doc = sys.modules["__main__"].__doc__ or ""
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec, cfg, want_help = parse(argv, default_config, extra)
    except UsageError as e:
        print(f"{module}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if want_help:
        print(help_text(module, doc, spec, cfg))
        raise SystemExit(0)
    quiet()
    try:
        if check is not None:
            check(cfg)
        if os.environ.get("JAX_IMPLICIT_CHECK_ONLY"):
            print(f"{module}: --config={spec} and its overrides check out")
            return
        persistent_cache()
        result = run(cfg)
    except (ValueError, OSError, *errors) as e:
        if os.environ.get("JAX_IMPLICIT_TRACEBACK"):
            raise
        print(f"{module}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if result is not None:
        print(result if isinstance(result, (str, Path)) else json.dumps(result, indent=2, default=str))
