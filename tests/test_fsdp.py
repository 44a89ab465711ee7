"""FSDP through accelerate's plugin (FSDP2 `fully_shard`) on 2 CPU processes over gloo, against one process.

Every FSDP run goes through one `accelerate launch --config_file examples/accelerate/fsdp.yaml` (a driver that
trains several configs in turn: process start-up is most of the cost). Oracles: the same run in one process with
the same global batch (2 processes x 2 = 1 x 4), and PEFT loading the adapter the FSDP run saved.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtune.config import load_config
from lmtune.train import run

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["The capital of France is Paris.", "What is two plus two? It is four.", "Hello there, how are you today?",
         "I am a small language model made for tests.", "Name three colors: red, green and blue.", "It is four.",
         "red, green and blue", "Paris is the capital."]
METHODS = {"full": ["method=full", "train.lr=1e-3"],
           "lora": ["method=lora", "method.init=random", "method.target_modules=all-linear", "train.lr=1e-2"],
           "prompt": ["method=prompt", "method.num_virtual_tokens=4", "train.lr=1e-2"]}
DRIVER = """
import json, sys
from lmtune.config import load_config
from lmtune.train import run
for overrides in json.loads(open(sys.argv[1]).read()):
    run(load_config(None, overrides))
"""


def _common(tmp: Path, model_dir: str, name: str, method: str, *extra: str) -> list[str]:
    return [f"model.name={model_dir}", f"data.train={tmp / 'texts.jsonl'}", f"output_dir={tmp / name}",
            "train.device=cpu", "train.schedule=constant", "train.max_grad_norm=0.5", "train.steps=3",
            *METHODS[method], *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=f"{what}: {key}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir) -> Path:
    """One-process runs (batch 4, in this process), then every FSDP run (batch 2 x 2 processes) in one launch."""
    tmp = tmp_path_factory.mktemp("fsdp")
    (tmp / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    lora_ckpt = ["train.steps=4", "train.save_every=2", "train.keep_checkpoints=3"]
    for method in METHODS:
        run(load_config(None, _common(tmp, model_dir, f"one-{method}", method, "train.batch_size=4",
                                      *(lora_ckpt if method == "lora" else []))))
    sharded = [_common(tmp, model_dir, f"fsdp-{m}", m, "train.batch_size=2", *(lora_ckpt if m == "lora" else []))
               for m in METHODS]
    # Resumed under FSDP from the FSDP run's step-2 checkpoint (which must equal the one-process one).
    sharded.append(_common(tmp, model_dir, "fsdp-resumed", "lora", "train.batch_size=2", *lora_ckpt,
                           f"resume={tmp / 'fsdp-lora' / 'checkpoints' / 'step-00000002'}"))
    (tmp / "runs.json").write_text(json.dumps(sharded))
    (tmp / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "examples" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
                           "--main_process_port", str(_free_port()), str(tmp / "driver.py"), str(tmp / "runs.json")],
                          env=env, capture_output=True, text=True, timeout=400)
    (tmp / "launch.log").write_text(done.stderr)
    assert done.returncode == 0, f"{tmp / 'launch.log'}: {done.stderr[-3000:]}"
    return tmp


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp_on_two_processes_equals_one_process_with_the_same_global_batch(runs, method):
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    _assert_same_tensors(load_file(runs / f"fsdp-{method}" / name), load_file(runs / f"one-{method}" / name), name)
    sharded, single = (json.loads((runs / f"{d}-{method}" / "summary.json").read_text()) for d in ("fsdp", "one"))
    assert sharded["effective_batch"] == single["effective_batch"] == 4
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert sharded["trainable_params"] == single["trainable_params"]


def test_fsdp_checkpoint_is_the_one_process_checkpoint_and_peft_loads_the_adapter(runs, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lmtune

    for part in ("trainable", "optimizer"):
        name = f"checkpoints/step-00000002/{part}.safetensors"
        _assert_same_tensors(load_file(runs / "fsdp-lora" / name), load_file(runs / "one-lora" / name), name)
    config = json.loads((runs / "fsdp-lora" / "adapter_config.json").read_text())
    assert config == json.loads((runs / "one-lora" / "adapter_config.json").read_text())
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), runs / "fsdp-lora").eval()
    ours = lmtune.load(runs / "one-lora")[0]
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_run_resumed_under_fsdp_ends_as_the_uninterrupted_one(runs):
    """Steps 3-4 under FSDP from the step-2 checkpoint (weights and AdamW moments re-sharded) end as one process."""
    name = "adapter_model.safetensors"
    _assert_same_tensors(load_file(runs / "fsdp-resumed" / name), load_file(runs / "one-lora" / name), name)
    def losses(run: str) -> list[tuple[int, float]]:
        rows = [json.loads(r) for r in (runs / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], round(r["loss"], 5)) for r in rows if "loss" in r]

    assert losses("fsdp-resumed") == losses("one-lora") and len(losses("one-lora")) == 4


@pytest.mark.parametrize("name, kind", [("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
                                        ("deepspeed_zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_parse_with_accelerates_own_classes(name, kind):
    """accelerate's ClusterConfig refuses unknown keys; the FSDP one also builds accelerate's FSDP plugin."""
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "examples" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind
    if kind == "FSDP":
        from accelerate.utils import FullyShardedDataParallelPlugin

        # accelerate launch turns fsdp_config into FSDP_* variables; the plugin reads them as in a launched run.
        env = {f"FSDP_{k.removeprefix('fsdp_').upper()}": str(v).lower() if isinstance(v, bool) else str(v)
               for k, v in config.fsdp_config.items()}
        with pytest.MonkeyPatch.context() as patch:
            for key, value in {**env, "ACCELERATE_USE_FSDP": "true"}.items():
                patch.setenv(key, value)
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    else:
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_print_launch_gives_a_multi_node_rendezvous(capsys):
    from lmtune.cli import main

    assert main(["train", "examples/quickstart.yaml", "--print-launch", "--nodes", "2", "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=HEAD_NODE:29500" in out
    assert "-m lmtune.cli train examples/quickstart.yaml" in out and "x 8" in out


def test_fsdp_estimate_splits_weights_gradients_and_optimizer_states(model_dir):
    """Per device under FSDP on 4 devices: a quarter of the states plus two gathered units, never more than DDP."""
    from lmtune.memory import estimate
    from lmtune.memory.core import MemoryPlan

    # Long enough rows that the training step, not the checkpoint save, is the peak on both.
    ddp = estimate(MemoryPlan(model=model_dir, method="full", devices=4, batch_size=4, seq_len=128))
    fsdp = estimate(MemoryPlan(model=model_dir, method="full", devices=4, batch_size=4, seq_len=128,
                               sharding="fsdp"))
    assert max(ddp.phases, key=ddp.phases.get) == max(fsdp.phases, key=fsdp.phases.get) == "training step"
    assert fsdp.optimizer == ddp.optimizer // 4
    assert ddp.weights // 4 < fsdp.weights < ddp.weights
    assert fsdp.activations == ddp.activations and fsdp.per_device < ddp.per_device
