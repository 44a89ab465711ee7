"""Every bad input a user can give, through the `lmtune` command: one line on stderr saying what is wrong and
how to fix it, exit status 2, no traceback, nothing half-written, earlier results and checkpoints intact.

Most cases call the CLI's `main` in this process (the path to the error is the same; each `lmtune` process
spends seconds importing torch); the ones that need a process of their own (a real file-size limit, a lock
held by another process) run `lmtune` as a subprocess.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
from conftest import build_model, build_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

import lmtune
import lmtune.resume
from lmtune.checkpoint import save
from lmtune.cli import main
from lmtune.methods import Method, register, unregister
from lmtune.methods.lora import LoraConfig
from lmtune.methods.lora import apply as lora_apply

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
CHAT = {"messages": [{"role": "user", "content": "What is two plus two?"},
                     {"role": "assistant", "content": "It is four."}]}
TRAIN = ["train", "model.name={model}", "data.train=good.jsonl", "output_dir=out", "train.device=cpu"]
UNFINISHED = ["train.steps=3", "train.save_every=1", "train.keep_checkpoints=2"]

# case: (arguments, the start of the one-line message). `{model}` etc. are the fixtures' paths.
CASES = {
    # data
    "malformed JSON line": ([*TRAIN[:2], "data.train=malformed.jsonl", *TRAIN[3:]],
                            "malformed.jsonl:2: not valid JSON"),
    "missing field": ([*TRAIN[:2], "data.train=missing_field.jsonl", *TRAIN[3:]],
                      "missing_field.jsonl:1: field 'completion' is missing"),
    "misspelt field": ([*TRAIN[:2], "data.train=misspelt_field.jsonl", *TRAIN[3:]],
                       "misspelt_field.jsonl:1: unknown record format with keys ['answer', 'question']"),
    "field of the wrong type": ([*TRAIN[:2], "data.train=wrong_field_type.jsonl", *TRAIN[3:]],
                                "wrong_field_type.jsonl:1: field 'completion' must be a string (a int)"),
    "empty dataset": ([*TRAIN[:2], "data.train=empty.jsonl", *TRAIN[3:]], "empty.jsonl: no records"),
    "not UTF-8": ([*TRAIN[:2], "data.train=latin1.jsonl", *TRAIN[3:]], "latin1.jsonl: not UTF-8 text"),
    "unknown data format": ([*TRAIN[:2], "data.train=data.xml", *TRAIN[3:]],
                            "data.xml: unknown data format '.xml'"),
    "missing data file": ([*TRAIN[:2], "data.train=nope.jsonl", *TRAIN[3:]], "data file not found: nope.jsonl"),
    "all labels masked": ([*TRAIN[:2], "data.train=long_prompt.jsonl", *TRAIN[3:], "data.max_length=8"],
                          "long_prompt.jsonl: no example has a token to learn after truncation to 8 tokens"),
    "longer than the model's limit": ([*TRAIN, "model.name={gpt2}", "data.train=long_text.jsonl"],
                                      ("an example has 452 tokens, more than this model's limit of 128 positions; "
                                      "set data.max_length=128")),
    "chat data, no chat template": ([*TRAIN, "model.name={no_template}"],
                                    "good.jsonl:1: chat data needs a chat template"),
    "eval split leaves nothing": ([*TRAIN, "data.eval_split=0.9"],
                                  "data.eval_split=0.9 leaves no training example out of 1"),
    "corrupt parquet": ([*TRAIN, "data.train=torn.parquet"], "torn.parquet: not a readable Parquet file ("),
    "data path is a directory": ([*TRAIN, "data.train=."], ". is a directory; name a data file in it"),
    "CSV row longer than its header": ([*TRAIN, "data.train=ragged.csv"],
                                       "ragged.csv:2: more values than the header has columns (prompt, completion)"),
    "no training data": ([*TRAIN, "data.train=[]"], "config: 'data.train': must not be empty (got [])"),
    "grad_accum beyond the data": ([*TRAIN, "train.grad_accum=1000000000"],
                                   "train.grad_accum=1000000000 needs 1000000000 micro-batches per optimizer step"),
    "batch beyond memory": ([*TRAIN, "train.batch_size=100000000"], "this run needs about "),
    # config
    "invalid YAML": (["train", "invalid.yaml"], "invalid.yaml: line 3 is not valid YAML"),
    "YAML not UTF-8": (["train", "latin1.yaml"], "latin1.yaml: not UTF-8 text (byte 0xe9 at offset 31)"),
    "YAML section twice": (["train", "twice.yaml"], "twice.yaml: line 4 is not valid YAML (key 'train' is given "
                                                   "twice (first on line 2); keep one)"),
    "override value not YAML": ([*TRAIN, "train.lr=[1"], "override 'train.lr=[1': the value is not valid YAML"),
    "negative count": ([*TRAIN, "train.warmup_steps=-10"], "config: 'train.warmup_steps': must be >= 0 (got -10)"),
    "negative seed": ([*TRAIN, "train.seed=-1"], "config: 'train.seed': must be >= 0 (got -1)"),
    "negative float": ([*TRAIN, "train.weight_decay=-0.1"], "config: 'train.weight_decay': must be >= 0 (got -0.1)"),
    "NaN": ([*TRAIN, "method.alpha=.nan"], "config: 'method.alpha': must be a finite number (got nan)"),
    "boolean for a number": ([*TRAIN, "train.batch_size=true"],
                             "config: 'train.batch_size': must be a number, not true / false"),
    "empty output_dir": ([*TRAIN, "output_dir=''"], "config: 'output_dir': must not be empty"),
    "wrong type in YAML": (["train", "wrong_type.yaml"],
                           "config: 'train.batch_size': Input should be a valid integer"),
    "misspelt key": ([*TRAIN, "train.lrr=1"], "config: unknown key 'train.lrr'; did you mean 'lr'?"),
    "missing required key": (["train", "model.name={model}"], "config: missing required key 'data'"),
    "unknown method": ([*TRAIN, "method=lora2"], "unknown method 'lora2'; choose one of:"),
    "unknown task": ([*TRAIN, "task=dpoo"], "config: 'task': Input should be"),
    "rank 0": ([*TRAIN, "method.r=0"], "config: 'method.r': must be >= 1 (got 0)"),
    "negative learning rate": ([*TRAIN, "train.lr=-1e-4"], "config: 'train.lr': must be > 0 (got '-1e-4')"),
    "infinite learning rate": ([*TRAIN, "train.lr=.inf"], "config: 'train.lr': must be a finite number"),
    "override without =": ([*TRAIN, "train.lr"], "override 'train.lr' is not key=value"),
    "target modules match nothing": ([*TRAIN, "method.target_modules=[qq_proj]"],
                                     "lora: target_modules ['qq_proj'] matched no module; linear modules here:"),
    "missing config file": (["train", "nope.yaml"], "config file not found: nope.yaml"),
    # output paths
    "output_dir is a file": ([*TRAIN, "output_dir=good.jsonl"], "output_dir good.jsonl is a file; give a directory"),
    "output_dir under a file": ([*TRAIN, "output_dir=good.jsonl/run"], "output_dir good.jsonl/run: "),
    "eval --out under a file": (["eval", "--model", "{model}", "--data", "good.jsonl", "--out", "good.jsonl/x.json"],
                                "--out good.jsonl/x.json: "),
    "eval --out a directory": (["eval", "--model", "{model}", "--data", "good.jsonl", "--out", "run"],
                               "--out run is a directory; give a file path"),
    "merge --out onto a file": (["merge", "run", "--out", "good.jsonl"], "--out good.jsonl is a file"),
    # command line
    "port out of range": (["studio", "--port", "70000"], "argument --port: invalid port '70000'"),
    "studio --runs a file": (["studio", "--runs", "good.jsonl"], "--runs good.jsonl is a file"),
    "NaN temperature": (["generate", "--model", "{model}", "--prompt", "hi", "--temperature", "nan"],
                        "temperature must be >= 0 and finite"),
    "missing option": (["merge", "run"], "the following arguments are required: --out (see lmtune merge --help)"),
    "unknown command": (["trian"], "argument COMMAND: invalid choice: 'trian'"),
    "bad option value": (["generate", "run", "--prompt", "hi", "--max-new-tokens", "many"],
                         "argument --max-new-tokens: invalid int value: 'many'"),
    # models and adapters
    "nonexistent model": ([*TRAIN, "model.name=./no-such-model"], "model not found: ./no-such-model"),
    "corrupt model weights": ([*TRAIN, "model.name={corrupt_model}"], "cannot load model"),
    "truncated GGUF": ([*TRAIN, "model.name=torn.gguf"], "torn.gguf: not a readable GGUF file ("),
    "empty GGUF": ([*TRAIN, "model.name=empty.gguf"], "empty.gguf: not a readable GGUF file ("),
    "pickle-only model": ([*TRAIN, "model.name={pickle_model}"], "{pickle_model} holds only pickle weights"),
    "remote code not trusted": ([*TRAIN, "model.name={remote_code}"], "cannot load model"),
    "nonexistent run": (["generate", "no-run", "--prompt", "hi"], "run directory not found: no-run"),
    "corrupt adapter weights": (["generate", "corrupt_adapter", "--prompt", "hi"],
                                "corrupt_adapter/adapter_model.safetensors: cannot read adapter weights"),
    "corrupt adapter config": (["generate", "corrupt_config", "--prompt", "hi"],
                               "corrupt_config/adapter_config.json: cannot read"),
    "aLoRA adapter": (["generate", "alora", "--prompt", "hi"], "alora/adapter_config.json: this PEFT LORA adapter sets "
                      "alora_invocation_tokens=[5, 6], which lmtune does not implement"),
    "DoRA adapter": (["generate", "dora", "--prompt", "hi"], "dora/adapter_config.json: this PEFT LORA adapter sets "
                     "use_dora=True"),
    "adapter on a changed base (PiSSA)": (["generate", "pissa", "--prompt", "hi"], "pissa/adapter_config.json: this "
                                          "PEFT LORA adapter was initialised with init_lora_weights='pissa'"),
    "adapter for a different base model": (["generate", "other_base", "--prompt", "hi"],
                                           "other_base/adapter_model.safetensors: base_model.model.model.layers.0"),
    "merge of a method that cannot merge": (["merge", "no_merge", "--out", "merged"], "cannot merge 'nomerge'"),
    "merge into a non-empty directory": (["merge", "run", "--out", "run"], "run exists and is not empty"),
    # runs and checkpoints
    "finished run not overwritten": ([*TRAIN, "output_dir=run"], "run already holds a finished run"),
    "resume from nothing": ([*TRAIN, "resume=nowhere"], "resume: nowhere is not a checkpoint"),
    "resume with another config": ([*TRAIN, "output_dir=unfinished", "train.lr=1"],
                                   ("resume: unfinished/checkpoints/step-00000003 was trained with train.lr=0.0002 "
                                   "but this config says 1.0")),
    "unfinished run, resume never": ([*TRAIN, "output_dir=unfinished", "resume=never"],
                                     "unfinished holds checkpoints of an unfinished run; resume it"),
    "corrupt checkpoint": ([*TRAIN, "output_dir=torn", *UNFINISHED], ("resume: cannot read torn/checkpoints/step-00000002/"
                                                        "trainable.safetensors")),
}


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under `root` with a hash of its bytes: any write shows."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def one_line_error(code: int, stderr: str, alone: bool = True) -> str:
    """Exit 2, no traceback, one `lmtune: error:` line (the only line when `alone`); returns the message."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("lmtune: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    if alone:
        assert len(lines) == 1, stderr
    return errors[0].removeprefix("lmtune: error: ")


def in_process(args: list[str], capfd) -> tuple[int, str]:
    capfd.readouterr()
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capfd.readouterr().err


@pytest.fixture(autouse=True, scope="module")
def library_settings_restored():
    """`main` quiets transformers and sets the lmtune log level for the process; undo it for other tests."""
    import transformers.utils.logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    level = logging.getLogger("lmtune").level
    yield
    hf_logging.set_verbosity(verbosity)
    hf_logging.enable_progress_bar() if bars else hf_logging.disable_progress_bar()
    logging.getLogger("lmtune").setLevel(level)


class NoMergeConfig(LoraConfig):
    name: Literal["nomerge"] = "nomerge"


@pytest.fixture(scope="module")
def no_merge_method():
    """A method without a merge (as prompt methods are), registered for this module only."""
    register(Method(name="nomerge", config=NoMergeConfig, apply=lora_apply,
                    merge_refusal="it adds inputs, not weights"))
    yield
    unregister("nomerge")


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def save_model(path: Path, model: torch.nn.Module, chat_template: str | None = "default") -> str:
    model.save_pretrained(path)
    (build_tokenizer() if chat_template == "default" else build_tokenizer(chat_template)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory, model_dir, no_merge_method) -> dict[str, str]:
    """A directory of bad inputs (and a few good runs to damage); returns the `{name}` paths for CASES."""
    w = tmp_path_factory.mktemp("bad")
    write_jsonl(w / "good.jsonl", [CHAT])
    write_jsonl(w / "malformed.jsonl", [CHAT, '{"messages": ['])
    write_jsonl(w / "missing_field.jsonl", [{"prompt": "hi"}])
    write_jsonl(w / "misspelt_field.jsonl", [{"question": "hi", "answer": "ok"}])
    write_jsonl(w / "wrong_field_type.jsonl", [{"prompt": "hi", "completion": 4}])
    (w / "empty.jsonl").write_text("\n")
    (w / "latin1.jsonl").write_bytes(json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"))
    (w / "data.xml").write_text("hello\n")
    write_jsonl(w / "long_prompt.jsonl", [{"prompt": "red green blue " * 20, "completion": "ok"}])
    write_jsonl(w / "long_text.jsonl", [{"text": "red green and blue " * 50}])
    (w / "invalid.yaml").write_text("data:\n  train: [good.jsonl\n")
    (w / "wrong_type.yaml").write_text("data: {train: good.jsonl}\ntrain: {batch_size: four}\n")
    (w / "latin1.yaml").write_bytes("data: {train: good.jsonl}\n# caf\u00e9\n".encode("latin-1"))
    (w / "twice.yaml").write_text("data: {train: good.jsonl}\ntrain: {lr: 1.0e-3}\nmodel: x\ntrain: {steps: 1}\n")
    (w / "torn.parquet").write_bytes(b"PAR1" + b"\x00" * 60)
    (w / "ragged.csv").write_text("prompt,completion\nhi,ok,extra\n")
    (w / "torn.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05")  # the header stops inside the tensor count
    (w / "empty.gguf").write_bytes(b"")

    paths = {"model": model_dir, "gpt2": save_model(w / "gpt2", build_model("gpt2")),
             "no_template": save_model(w / "no_template", build_model("llama"), chat_template=None)}
    shutil.copytree(model_dir, w / "corrupt_model")
    (w / "corrupt_model" / "model.safetensors").write_bytes(b"\x00" * 64)
    paths["corrupt_model"] = str(w / "corrupt_model")
    pickled = w / "pickle_model"
    shutil.copytree(model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"marker": torch.zeros(1)}, pickled / "pytorch_model.bin")
    paths["pickle_model"] = str(pickled)
    remote = w / "remote_code"
    remote.mkdir()
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text(f"open({str(w / 'REMOTE_CODE_RAN')!r}, 'w').write('ran')\n")
    paths["remote_code"] = str(remote)

    # Runs: a finished LoRA run, damaged copies of it, one on another base, one of a method that cannot merge.
    base = lmtune.load_model(model_dir)[0]
    tuned = lmtune.apply(base, {"name": "lora", "init": "random"}, base_name=model_dir)
    save(tuned, w / "run", build_tokenizer())
    for name in ("corrupt_adapter", "corrupt_config", "other_base", "alora", "dora", "pissa"):
        shutil.copytree(w / "run", w / name)
        (w / name / "lmtune.json").unlink()  # a plain PEFT adapter directory
    (w / "corrupt_adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    (w / "corrupt_config" / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    wider = save_model(w / "wider_llama", AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=320, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)))
    peft = json.loads((w / "other_base" / "adapter_config.json").read_text())
    (w / "other_base" / "adapter_config.json").write_text(json.dumps({**peft, "base_model_name_or_path": wider}))
    for name, option in (("alora", {"alora_invocation_tokens": [5, 6]}), ("dora", {"use_dora": True}),
                         ("pissa", {"init_lora_weights": "pissa"})):  # options that change PEFT's outputs
        (w / name / "adapter_config.json").write_text(json.dumps({**peft, **option}))
    save(lmtune.apply(lmtune.load_model(model_dir)[0], "nomerge", base_name=model_dir), w / "no_merge")

    from lmtune.config import load_config
    from lmtune.train import run

    cwd = os.getcwd()
    os.chdir(w)  # the same relative paths as the cases use, so that a resume sees the same config
    try:
        for name in ("unfinished", "torn"):
            run(load_config(None, [t.format(**paths) for t in TRAIN[1:]] + [f"output_dir={name}", *UNFINISHED]))
            (w / name / "lmtune.json").unlink()  # as if killed while writing the result
    finally:
        os.chdir(cwd)
    (w / "torn" / "checkpoints" / "step-00000002" / "trainable.safetensors").write_bytes(b"torn")
    shutil.rmtree(w / "torn" / "checkpoints" / "step-00000003")
    return {"dir": str(w), **paths}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(work, capfd, monkeypatch, case):
    w = Path(work["dir"])
    monkeypatch.chdir(w)
    args, expected = CASES[case]
    before = snapshot(w)
    code, stderr = in_process([a.format(**work) for a in args], capfd)
    assert one_line_error(code, stderr).startswith(expected.format(**work))
    assert snapshot(w) == before  # nothing written, nothing removed, earlier runs and checkpoints intact
    assert not (w / "REMOTE_CODE_RAN").exists()


def run_killed_at(work: dict[str, str], out: str, capfd, *extra: str) -> tuple[str, dict, dict]:
    """Train `out` for 3 steps, checkpointing every step, through `main`; (message, before, after) snapshots."""
    w = Path(work["dir"])
    before = snapshot(w)
    code, stderr = in_process([*(a.format(**work) for a in TRAIN), f"output_dir={out}", *UNFINISHED, *extra],
                              capfd)
    return one_line_error(code, stderr, alone=False), before, snapshot(w)


def test_disk_full_at_a_checkpoint_keeps_the_earlier_one(work, capfd, monkeypatch):
    monkeypatch.chdir(work["dir"])
    real_write = lmtune.resume._write

    def full_at_step_2(path: Path, data: bytes) -> None:
        if ".tmp-step-00000002" in str(path) and path.name == "optimizer.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(lmtune.resume, "_write", full_at_step_2)
    message, _, after = run_killed_at(work, "full_disk", capfd)
    assert message.startswith("cannot write full_disk/checkpoints/.tmp-step-00000002")
    assert "No space left on device; free disk space or choose a writable output_dir" in message
    checkpoints = sorted(k for k in after if k.startswith("full_disk/checkpoints/"))
    assert checkpoints[0] == "full_disk/checkpoints/step-00000001" and not any(".tmp" in k for k in checkpoints)
    assert not any(k.startswith("full_disk/checkpoints/step-00000002") for k in checkpoints)
    monkeypatch.setattr(lmtune.resume, "_write", real_write)
    code, stderr = in_process([*(a.format(**work) for a in TRAIN), "output_dir=full_disk", *UNFINISHED], capfd)
    assert code == 0, stderr  # space freed: the run resumes from checkpoint 1 and finishes


def test_read_only_output_directory(work, capfd, monkeypatch):
    monkeypatch.chdir(work["dir"])
    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name == "read_only":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    message, before, after = run_killed_at(work, "read_only", capfd)
    assert message == ("cannot write read_only: Read-only file system; free disk space or choose a writable "
                       "output_dir (earlier checkpoints are intact)")
    assert after == before


def test_nan_loss_through_the_command(work, capfd, monkeypatch):
    monkeypatch.chdir(work["dir"])
    message, _, after = run_killed_at(work, "diverged", capfd, "method=full", "train.lr=1e30", "train.steps=4")
    assert message == ("the gradient norm became nan at step 2; stopped before updating the weights (the last good "
                       "checkpoint is diverged/checkpoints/step-00000001); lower train.lr, set train.max_grad_norm, "
                       "or check the data")
    assert "diverged/checkpoints/step-00000001/state.json" in after and "diverged/lmtune.json" not in after
    assert not any(k.startswith("diverged/checkpoints/step-00000002") for k in after)


def test_file_size_limit(work, capfd, monkeypatch):
    """A real write failure from the kernel (EFBIG under RLIMIT_FSIZE, as a full disk fails a write)."""
    monkeypatch.chdir(work["dir"])
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, limits[1]))
    try:
        message, _, after = run_killed_at(work, "too_big", capfd, "method=full", "train.steps=1")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert message.startswith("cannot write too_big/checkpoints/.tmp-step-00000001-") and "File too large" in message
    assert not any(k.startswith("too_big/checkpoints/") for k in after) and "too_big/lmtune.json" not in after


def test_output_directory_of_a_live_run(work, capfd):
    """Another process holds the run's lock: refused before anything is loaded or written."""
    out = Path(work["dir"]) / "live"
    out.mkdir()
    hold = ("import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write(str(os.getpid())); f.flush(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out / ".lmtune.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        code, stderr = in_process([*(a.format(**work) for a in TRAIN), f"output_dir={out}"], capfd)
        assert one_line_error(code, stderr) == (f"{out} is in use by a running lmtune process (pid {holder.pid}); "
                                                "wait for it to finish or choose another output_dir")
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()


def test_remote_code_runs_only_when_asked(work):
    """The refusal above is the default; with model.trust_remote_code the checkpoint's own code is imported."""
    from lmtune.models import load_weights

    marker = Path(work["dir"]) / "REMOTE_CODE_RAN"
    with pytest.raises(lmtune.LmtuneError, match="cannot load model"):
        load_weights(work["remote_code"])
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - evil.py defines no classes; what matters is that it ran
        load_weights(work["remote_code"], trust_remote_code=True)
    assert marker.read_text() == "ran"
    marker.unlink()


def test_merge_that_fails_midway_leaves_no_directory(work, capfd, monkeypatch):
    """Disk full while the merged model is written: one line, and neither `--out` nor a temp directory left."""
    from transformers import PreTrainedModel

    w = Path(work["dir"])
    monkeypatch.chdir(w)
    real_save = PreTrainedModel.save_pretrained

    def save_then_fail(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)  # half of a merge's files are on disk by now
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    before = snapshot(w)
    code, stderr = in_process(["merge", "run", "--out", "merged/model"], capfd)
    assert one_line_error(code, stderr) == ("cannot write merged/model: No space left on device; free disk space "
                                            "or choose a writable directory")
    assert snapshot(w) == {**before, "merged": "dir"}  # the parent may stay; nothing inside it


def test_eval_out_in_a_missing_directory_is_created_once_the_result_exists(work, capfd, monkeypatch, tmp_path):
    """Not an error (it was a traceback): the directory is made after scoring, and the JSON written whole."""
    monkeypatch.chdir(work["dir"])
    out = tmp_path / "new" / "deeper" / "eval.json"
    code, stderr = in_process(["eval", "--model", work["model"], "--data", "good.jsonl", "--out", str(out)], capfd)
    assert code == 0, stderr
    assert json.loads(out.read_text())["examples"] == 1 and list(out.parent.iterdir()) == [out]
