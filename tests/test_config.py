"""fdreamer.config: YAML + extends + dotted overrides, with precise errors for each failure kind."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from fdreamer.config import ConfigError, dump_yaml, flatten, help_text, load_config, nested, opt, parse_cli, to_dict


@dataclass
class Optim:
    lr: float = opt(5e-5, "learning rate")
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    clip: float | None = opt(1.0, "gradient clipping norm; null disables")


@dataclass
class Data:
    path: str = opt(help="Parquet dataset path")  # required
    frames: int = opt(8, "frames per clip")
    columns: list[str] = opt(["latents", "t5"], "columns to read")
    kind: Literal["webvid", "pexels"] = opt("webvid", "manifest kind")


@dataclass
class Job:
    name: str = opt("run", "run name")
    fp16: bool = opt(False, "half precision")
    optim: Optim = nested(Optim, "optimizer")
    data: Data = nested(Data, "data")  # Data has a required field, so the default factory fails


@dataclass
class Job2:
    name: str = opt("run", "run name")
    optim: Optim = nested(Optim, "optimizer")
    data: Data | None = opt(None, "data")


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_defaults_and_overrides(tmp_path):
    f = write(tmp_path, "a.yaml", "name: s1\noptim:\n  lr: 1e-4\ndata:\n  path: /x\n")
    cfg = load_config(Job, f, ["--optim.lr=2e-4", "data.frames=16", "--data.columns=[a, b]", "--fp16=true"])
    assert cfg.name == "s1" and cfg.fp16 is True
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.data.frames == 16 and cfg.data.columns == ["a", "b"] and cfg.data.path == "/x"


def test_extends_derives_rather_than_copies(tmp_path):
    write(tmp_path, "base.yaml", "name: base\noptim:\n  lr: 1e-4\n  clip: 0.5\ndata:\n  path: /base\n  frames: 32\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\ndata:\n  frames: 16\n")
    cfg = load_config(Job, child)
    assert (cfg.name, cfg.optim.lr, cfg.optim.clip, cfg.data.path, cfg.data.frames) == ("child", 1e-4, 0.5, "/base", 16)


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    b = write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Job, b)


def test_unknown_key_names_key_file_and_suggests(tmp_path):
    f = write(tmp_path, "bad.yaml", "optim:\n  lrr: 1e-4\ndata:\n  path: /x\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Job, f)
    msg = str(exc.value)
    assert "unknown key 'optim.lrr'" in msg and str(f) in msg and "did you mean 'optim.lr'" in msg


def test_unknown_key_from_override_names_the_override(tmp_path):
    f = write(tmp_path, "ok.yaml", "data:\n  path: /x\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.momentum'.*command-line override '--optim\.momentum=0\.9'"):
        load_config(Job, f, ["--optim.momentum=0.9"])


@pytest.mark.parametrize(
    "text,key,expected",
    [
        ("data:\n  path: /x\n  frames: eight\n", "data.frames", "expected int"),
        ("data:\n  path: /x\n  frames: 8.5\n", "data.frames", "expected int"),
        ("data:\n  path: /x\nfp16: yes please\n", "fp16", "expected bool"),
        ("data:\n  path: /x\noptim:\n  lr: fast\n", "optim.lr", "expected float"),
        ("data:\n  path: /x\n  kind: youtube\n", "data.kind", "expected one of 'webvid', 'pexels'"),
        ("data:\n  path: /x\n  columns: latents\n", "data.columns", "expected list"),
        ("data:\n  path: /x\noptim:\n  betas: [0.9]\n", "optim.betas", "with 2 items"),
        ("data:\n  path: /x\noptim: 3\n", "optim", "must be a mapping"),
        ("data:\n  path: [1, 2]\n", "data.path", "expected str"),
    ],
)
def test_wrong_types_name_key_and_file(tmp_path, text, key, expected):
    f = write(tmp_path, "t.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_config(Job, f)
    msg = str(exc.value)
    assert f"'{key}'" in msg and expected in msg and str(f) in msg


def test_bool_is_not_an_int_and_int_is_a_float(tmp_path):
    f = write(tmp_path, "t.yaml", "data:\n  path: /x\n  frames: true\n")
    with pytest.raises(ConfigError, match="expected int"):
        load_config(Job, f)
    g = write(tmp_path, "u.yaml", "data:\n  path: /x\noptim:\n  lr: 1\n  clip: null\n")
    cfg = load_config(Job, g)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.clip is None


def test_missing_required_value_names_key_and_file(tmp_path):
    f = write(tmp_path, "m.yaml", "name: x\ndata:\n  frames: 8\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Job, f)
    msg = str(exc.value)
    assert "missing required value 'data.path'" in msg and str(f) in msg and "Parquet dataset path" in msg


def test_missing_required_in_absent_section(tmp_path):
    f = write(tmp_path, "n.yaml", "name: x\n")
    with pytest.raises(ConfigError, match=r"missing required value 'data\.path'"):
        load_config(Job, f)


def test_optional_nested_dataclass(tmp_path):
    assert load_config(Job2).data is None
    cfg = load_config(Job2, overrides=["--data.path=/p"])
    assert cfg.data.path == "/p" and cfg.data.frames == 8


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Job, tmp_path / "nope.yaml")
    bad = write(tmp_path, "bad.yaml", "a: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_config(Job, bad)
    lst = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Job, lst)
    with pytest.raises(ConfigError, match="must look like --key.sub=value"):
        load_config(Job, overrides=["--data.path"])


def test_dataclass_validation_is_reported_with_location(tmp_path):
    from fdreamer.schedule import ScheduleConfig

    f = write(tmp_path, "s.yaml", "beta_start: 0.5\nbeta_end: 0.1\n")
    with pytest.raises(ConfigError, match=r"invalid ScheduleConfig.*beta_start < beta_end"):
        load_config(ScheduleConfig, f)


def test_round_trip_dump_and_flatten(tmp_path):
    cfg = load_config(Job, overrides=["--data.path=/x", "--optim.lr=3e-4"])
    again = load_config(Job, write(tmp_path, "dump.yaml", dump_yaml(cfg)))
    assert again == cfg
    flat = flatten(to_dict(cfg))
    assert flat["optim.lr"] == 3e-4 and flat["data.path"] == "/x"


def test_parse_cli_and_help(tmp_path, capsys):
    f = write(tmp_path, "c.yaml", "data:\n  path: /x\n")
    cfg, path = parse_cli(Job, ["--config", str(f), "--optim.lr", "7e-5", "--name=z"])
    assert path == str(f) and cfg.optim.lr == 7e-5 and cfg.name == "z"
    with pytest.raises(SystemExit):
        parse_cli(Job, ["--help"])
    out = capsys.readouterr().out
    assert "--optim.lr (float, default 5e-05): learning rate" in out
    assert "--data.path (str, required): Parquet dataset path" in out
    assert "--optim.lr" in help_text(Job)


@pytest.mark.parametrize(
    "text,where",
    [
        ("name: " + "[" * 5000 + "]" * 5000 + "\n", ""),  # PyYAML alone: RecursionError
        ("data:\n  path: /x\n  columns: " + "[" * 40 + "]" * 40 + "\n", "at 'data.columns[0][0]"),
        ("".join("  " * i + f"k{i}:\n" for i in range(40)), "at 'k0.k1.k2"),  # block mappings
    ],
)
def test_deeply_nested_yaml_is_a_config_error_naming_the_file(tmp_path, text, where):
    f = write(tmp_path, "deep.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_config(Job, f)
    msg = str(exc.value)
    assert f"cannot parse YAML in {f}" in msg and "nested more than 32 levels deep" in msg and where in msg
    with pytest.raises(ConfigError, match=r"the value of override '--name=\[\[\[.*\.\.\.'.*more than 32 levels"):
        load_config(Job, overrides=["--data.path=/x", "--name=" + "[" * 3000 + "]" * 3000])
    # 32 levels (the top-level mapping, data, 30 lists) are fine.
    ok = write(tmp_path, "ok.yaml", "data:\n  path: /x\n  columns: " + "[" * 30 + "]" * 30 + "\n")
    with pytest.raises(ConfigError, match=r"wrong type for 'data\.columns\[0\]'.*expected str"):  # parsed, then typed
        load_config(Job, ok)


def test_yaml_value_errors_name_the_file(tmp_path):
    f = write(tmp_path, "date.yaml", "name: 2024-13-45\ndata:\n  path: /x\n")  # a date PyYAML cannot build
    with pytest.raises(ConfigError, match=rf"cannot parse YAML in {f}: month must be in 1\.\.12"):
        load_config(Job, f)
    g = tmp_path / "bin.yaml"
    g.write_bytes(b"\xff\xfe\x00name: x")
    with pytest.raises(ConfigError, match=rf"cannot read config file {g}"):
        load_config(Job, g)


def test_preprocess_config_rejects_values_that_would_fail_late(tmp_path):
    """dedup_bands must split the perceptual hash, decode_timeout_s must not be negative (both are read)."""
    from pipelines.config import PreprocessConfig

    for bands in (1, 2, 4, 8, 16, 32):
        assert load_config(PreprocessConfig, overrides=[f"--dedup_bands={bands}"]).dedup_bands == bands
    f = write(tmp_path, "pp.yaml", "dedup_bands: 5\n")
    with pytest.raises(ConfigError, match=rf"{f}.*dedup_bands must divide the 32-byte perceptual hash.*got 5"):
        load_config(PreprocessConfig, f)
    with pytest.raises(ConfigError, match="decode_timeout_s must be >= 0"):
        load_config(PreprocessConfig, overrides=["--profile.decode_timeout_s=-1"])
    # The shipped profiles load, and every key they set is a field of the config.
    repo = Path(__file__).resolve().parents[1]
    for name in ("tiny", "stage1", "stage2"):
        cfg = load_config(PreprocessConfig, repo / "pipelines" / "configs" / f"{name}.yaml")
        assert cfg.profile.stage_dict()["tag"] == cfg.profile.tag
