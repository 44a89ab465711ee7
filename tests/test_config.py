"""One typed config: defaults, YAML round trip, dotted overrides, and one-line errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmtune.config import RunConfig, dump_config, load_config
from lmtune.errors import LmtuneError


def write(tmp_path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error(path: str | None, *overrides: str) -> str:
    with pytest.raises(LmtuneError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults():
    cfg = load_config(None, ["data.train=d.jsonl"])
    assert [(s.path, s.weight) for s in cfg.data.train] == [("d.jsonl", 1.0)]
    assert (cfg.data.eval, cfg.data.eval_split, cfg.data.max_length, cfg.data.prompt_format) == (None, 0.0, 1024,
                                                                                                 "auto")
    assert (cfg.model.name, cfg.model.dtype, cfg.model.trust_remote_code) == (None, "float32", False)
    # The default method is a validated config object, like a named one, not the bare string.
    assert cfg.method.model_dump() == load_config(None, ["data.train=d.jsonl", "method=lora"]).method.model_dump()
    assert (cfg.method.name, cfg.method.r, cfg.method.alpha) == ("lora", 8, 16.0)
    t = cfg.train
    assert (t.steps, t.epochs, t.batch_size, t.grad_accum, t.lr, t.warmup_steps, t.schedule, t.max_grad_norm,
            t.seed) == (None, 1.0, 4, 1, 2e-4, 0, "cosine", 1.0, 42)
    assert (cfg.task, cfg.output_dir, cfg.overwrite) == ("sft", "runs/latest", False)
    assert yaml.safe_load(dump_config(cfg))["method"]["name"] == "lora"


def test_yaml_round_trip(tmp_path):
    path = write(tmp_path, """
model: /models/tiny
method: {name: lora, r: 4, alpha: 8, target_modules: [q_proj, v_proj]}
data: {train: train.jsonl, eval_split: 0.1, max_length: 256, prompt_format: plain}
train: {steps: 20, batch_size: 2, grad_accum: 3, lr: 1e-3, schedule: linear, warmup_steps: 2, max_grad_norm: null}
output_dir: runs/x
""")
    cfg = load_config(path)
    assert cfg.model.name == "/models/tiny"
    assert (cfg.method.r, cfg.method.alpha, cfg.method.target_modules) == (4, 8.0, ["q_proj", "v_proj"])
    assert (cfg.train.lr, cfg.train.grad_accum, cfg.train.max_grad_norm) == (1e-3, 3, None)
    again = load_config(write(tmp_path, dump_config(cfg), "dumped.yaml"))
    assert again.model_dump() == cfg.model_dump()
    assert dump_config(again) == dump_config(cfg)


def test_dotted_overrides(tmp_path):
    path = write(tmp_path, "data: {train: d.jsonl}\nmethod: lora\nmodel: /models/tiny\ntrain: {lr: 1e-3}\n")
    cfg = load_config(path, ["method.r=16", "train.lr=5e-5", "model.dtype=bfloat16", "train.steps=3",
                             "train.max_grad_norm="])
    assert (cfg.method.name, cfg.method.r) == ("lora", 16)
    assert (cfg.model.name, cfg.model.dtype) == ("/models/tiny", "bfloat16")
    assert (cfg.train.lr, cfg.train.steps, cfg.train.max_grad_norm) == (5e-5, 3, None)
    # Options alone select the default method; a mapping keeps its other options.
    assert load_config(None, ["data.train=d.jsonl", "method.r=4"]).method.r == 4
    both = load_config(write(tmp_path, "data: {train: d}\nmethod: {name: lora, r: 4}\n"), ["method.alpha=2"])
    assert (both.method.r, both.method.alpha) == (4, 2.0)
    assert load_config(path, ["method=full"]).method.name == "full"


@pytest.mark.parametrize("overrides, wanted", [
    (["trian.lr=1"], "config: unknown key 'trian'; did you mean 'train'?"),
    (["train.lrr=1"], "config: unknown key 'train.lrr'; did you mean 'lr'?"),
    (["data.max_lenght=8"], "config: unknown key 'data.max_lenght'; did you mean 'max_length'?"),
    (["method.rr=4"], "config: unknown key 'method.rr'; did you mean 'r'?"),
    (["method=full", "method.r=4"], "config: unknown key 'method.r'"),
    (["train.batch_size=two"], "config: 'train.batch_size': Input should be a valid integer"),
    (["train.lr=-1e-4"], "config: 'train.lr': must be > 0"),
    (["train.lr=0"], "config: 'train.lr': must be > 0"),
    (["train.steps=0"], "config: 'train.steps': must be >= 1"),
    (["data.eval_split=1.5"], "config: 'data.eval_split': must be < 1 (got 1.5)"),
    (["train.schedule=step"], "config: 'train.schedule': Input should be 'cosine', 'linear' or 'constant'"),
    (["method=nope"], "unknown method 'nope'; choose one of: "),
    (["method.r=0"], "config: 'method.r': must be >= 1 (got 0)"),
    (["method=lora", "method.r=0"], "config: 'method.r': must be >= 1 (got 0)"),
    (["train.lr.peak=1"], "override 'train.lr.peak': 'lr' is not a section"),
    (["output_dir.name=x"], "override 'output_dir.name': 'output_dir' is not a section"),
    (["overwrite.x=1"], "override 'overwrite.x': 'overwrite' is not a section"),
    (["train.lr"], "override 'train.lr' is not key=value"),
])
def test_bad_settings_are_one_line_naming_the_key(tmp_path, overrides, wanted):
    path = write(tmp_path, "data: {train: d.jsonl}\ntrain: {lr: 1e-3}\noutput_dir: runs/a\noverwrite: false\n")
    assert error(path, *overrides).startswith(wanted)


def test_unknown_and_mistyped_keys_in_yaml(tmp_path):
    assert error(write(tmp_path, "data: {train: d}\ntrian: {lr: 1}\n")) == \
        "config: unknown key 'trian'; did you mean 'train'?"
    assert error(write(tmp_path, "data: {train: d}\ntrain: {batchsize: 2}\n")) == \
        "config: unknown key 'train.batchsize'; did you mean 'batch_size'?"
    assert error(write(tmp_path, "data: {train: d}\ntrain: {lr: fast}\n")).startswith("config: 'train.lr': ")
    assert error(write(tmp_path, "data: {train: d}\nmethod: {name: lora, r: -2}\n")).startswith(
        "config: 'method.r': must be >= 1")


def test_missing_training_data(tmp_path):
    assert error(None) == "config: missing required key 'data'"
    assert error(write(tmp_path, "data: {eval: e.jsonl}\n")) == "config: missing required key 'data.train'"


def test_bad_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error(str(missing)) == f"config file not found: {missing}"
    bad = write(tmp_path, "data:\n  train: d.jsonl\n train: [1\n")
    assert error(bad).startswith(f"{bad}: line 3 is not valid YAML")
    listed = write(tmp_path, "- data\n- train\n")
    assert error(listed).startswith(f"{listed}: the top level must be a mapping")
    assert load_config(write(tmp_path, ""), ["data.train=d.jsonl"]).data.train[0].path == "d.jsonl"


def test_config_objects_validate_assignment():
    cfg = RunConfig(data={"train": "d.jsonl"})
    with pytest.raises(ValueError):
        cfg.train.lr = -1.0


def _numeric_fields() -> list[tuple[str, object, list[str]]]:
    """(dotted key, pydantic field, overrides that select its section) for every int / float key of every config."""
    from typing import get_args

    from pydantic import BaseModel

    from lmtune.methods import get_method, method_names

    def walk(cls, prefix, extra):
        for name, field in cls.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from walk(field.annotation, f"{prefix}{name}.", extra)
            elif {field.annotation, *get_args(field.annotation)} & {int, float}:
                yield f"{prefix}{name}", field, extra

    found = list(walk(RunConfig, "", []))
    for method in method_names():
        found += walk(get_method(method).config, "method.", [f"method.name={method}"])
    return found


NUMERIC = _numeric_fields()


@pytest.mark.parametrize("key, field, extra", NUMERIC, ids=[f"{k}[{','.join(e)}]" for k, _, e in NUMERIC])
def test_every_numeric_key_has_bounds_and_refuses_values_past_them(key, field, extra):
    """Each number of the typed config has a bound (a new key without one fails here); the value just past each
    bound, and NaN and infinity for floats, are one-line errors that name the key."""
    from typing import get_args

    import annotated_types as at

    from lmtune.errors import LmtuneError

    is_float = float in {field.annotation, *get_args(field.annotation)}
    step = 0.5 if is_float else 1
    past = {at.Ge: lambda b: b.ge - step, at.Gt: lambda b: b.gt, at.Le: lambda b: b.le + step, at.Lt: lambda b: b.lt}
    bad = [past[type(m)](m) for m in field.metadata if type(m) in past]
    assert bad, f"{key} has no bound"
    for value in [*bad, *([".nan", ".inf", "-.inf"] if is_float else [])]:
        with pytest.raises(LmtuneError) as err:
            load_config(None, ["data.train=x.jsonl", *extra, f"{key}={value}"])
        assert str(err.value).startswith(f"config: '{key}': ") and "\n" not in str(err.value), (value, str(err.value))


def test_a_data_source_weight_is_bounded():
    from lmtune.errors import LmtuneError

    for weight in ("0", "-1", "1001", "NaN"):
        with pytest.raises(LmtuneError, match=r"^config: 'data.train.0.weight': must be"):
            load_config(None, [f'data.train=[{{"path": "x.jsonl", "weight": {weight}}}]'])


def test_the_method_section_is_a_union_of_the_method_configs():
    from lmtune.methods import method_names
    from lmtune.methods.lora import LoraConfig

    schema = RunConfig.model_json_schema()
    refs = [r["$ref"].split("/")[-1] for r in schema["properties"]["method"]["oneOf"]]
    assert sorted(schema["$defs"][ref]["properties"]["name"]["const"] for ref in refs) == method_names()
    own = LoraConfig(r=3)
    cfg = RunConfig(data={"train": "d.jsonl"}, method=own)
    assert cfg.method is own
    cfg.method = "ia3"  # assignment goes through the union too
    assert type(cfg.method).__name__ == "IA3Config"
    with pytest.raises(ValueError):
        cfg.method = {"name": "ia3", "r": 4}
    # A dump without defaults still names its method, so it parses back to the same config.
    sparse = RunConfig(data={"train": "d.jsonl"}, method={"name": "prefix", "num_virtual_tokens": 4})
    assert sparse.model_dump(exclude_defaults=True)["method"] == {"name": "prefix", "num_virtual_tokens": 4}
    assert RunConfig.model_validate(sparse.model_dump(exclude_defaults=True)) == sparse
    assert RunConfig.model_validate(cfg.model_dump()) == cfg


@pytest.mark.parametrize("overrides, wanted", [
    (["method=5"], "config: 'method': must be a method name or a mapping with a 'name' key (got 5)"),
    (["method=[lora]"], "config: 'method': must be a method name or a mapping with a 'name' key (got ['lora'])"),
    (["method.name="], "unknown method 'None'; choose one of: adapter, freeze, full, ia3, "),
    (["method=prefix", "method.num_virtual_tokens=zero"],
     "config: 'method.num_virtual_tokens': Input should be a valid integer"),
    (["method=prefix", "method.num_virtual_token=4"],
     "config: unknown key 'method.num_virtual_token'; did you mean 'num_virtual_tokens'?"),
])
def test_bad_method_sections_are_one_line_without_the_union_tag(tmp_path, overrides, wanted):
    assert error(None, "data.train=d.jsonl", *overrides).startswith(wanted)


def test_a_config_written_by_an_earlier_version_loads_and_dumps_the_same():
    """config.yaml of a run from before the method section was a union: the same config, and it dumps every value
    it had (keys added since then appear with their defaults)."""
    import yaml

    path = Path(__file__).parent / "fixtures" / "config_written_before_the_method_union.yaml"
    cfg = load_config(path)
    assert (cfg.method.name, cfg.method.num_virtual_tokens, cfg.method.init, cfg.task) == ("prefix", 4, "vocab", "dpo")

    def within(old, new) -> bool:
        if isinstance(old, dict):
            return isinstance(new, dict) and all(k in new and within(v, new[k]) for k, v in old.items())
        return old == new

    assert within(yaml.safe_load(path.read_text()), yaml.safe_load(dump_config(cfg)))
    assert dump_config(load_config(path)) == dump_config(cfg)


def test_a_method_registered_later_joins_the_config():
    from typing import Literal

    from lmtune.methods import Method, MethodConfig, method_names, parse_method_config, register, unregister
    from lmtune.methods.lora import apply

    class LateConfig(MethodConfig):
        name: Literal["late"] = "late"
        k: int = 1

    register(Method(name="late", config=LateConfig, apply=apply))
    try:
        assert load_config(None, ["data.train=d.jsonl", "method=late", "method.k=3"]).method == LateConfig(k=3)
        assert parse_method_config({"name": "late"}) == LateConfig()
        assert error(None, "data.train=d.jsonl", "method=late", "method.r=3") == \
            "config: unknown key 'method.r'; known keys: name, k"
    finally:
        unregister("late")
    assert "late" not in method_names()
    assert error(None, "data.train=d.jsonl", "method=late").startswith("unknown method 'late'; choose one of: ")
