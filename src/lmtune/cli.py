"""The `lmtune` command: parse arguments, call the library, turn user errors into one line + exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from lmtune.errors import LmtuneError, os_error_line
from lmtune.memory.allocator import configure_allocator
from lmtune.runlock import check_new_path


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are user errors too: one line, exit 2 (argparse prints the usage block as well)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lmtune: error: {message} (see {self.prog} --help)\n")


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    p = _Parser(prog="lmtune", description="Fine-tune Hugging Face causal LMs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    epilog = None
    if "train" in argv and ("-h" in argv or "--help" in argv):  # importing every method costs seconds
        from lmtune.config import describe_keys

        epilog = describe_keys()
    t = sub.add_parser("train", help="train as a YAML config says", epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a model. Example: lmtune train examples/quickstart.yaml train.lr=1e-4")
    t.add_argument("config", nargs="?", help="YAML run config (optional when overrides give data.train)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. method.r=16")
    t.add_argument("--print-launch", action="store_true", help="print the torchrun / accelerate launch for "
                   "--nodes x --gpus and exit (trains nothing)")
    t.add_argument("--nodes", type=int, default=1, help="machines, for --print-launch (default 1)")
    t.add_argument("--gpus", type=int, default=8, help="GPUs per machine, for --print-launch (default 8)")
    t.add_argument("--sharding", default="ddp", help="ddp (replicas) or fsdp (sharded), for --print-launch")
    for name, help_text in (("generate", "answer one prompt"), ("chat", "talk with a model")):
        g = sub.add_parser(name, help=help_text, description=f"{help_text.capitalize()} with a trained run "
                           "or, with no RUN_DIR, a base model.")
        g.add_argument("run_dir", nargs="?", help="a run / adapter directory from lmtune train or PEFT")
        g.add_argument("--model", help="base model when no RUN_DIR is given (default: SmolLM2-135M-Instruct)")
        if name == "generate":
            g.add_argument("--prompt", required=True, help="the user message (chat template applied)")
            g.add_argument("--raw", action="store_true", help="send the prompt as plain text, no chat template")
        g.add_argument("--max-new-tokens", type=int, default=128 if name == "generate" else 256)
        g.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    _estimate_parser(sub)
    d = sub.add_parser("data", help="inspect training data", description="Inspect what a run would train on.")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    pv = dsub.add_parser("preview", help="rendered examples with the trained-on tokens marked, and counts",
                         description="Show the first examples of each training source exactly as tokenised, "
                         "the tokens that carry loss between [[ and ]], and counts (examples, tokens, truncated, "
                         "fully masked, bad). Loads the tokenizer only.")
    pv.add_argument("config", nargs="?", help="YAML run config")
    pv.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.train=x.jsonl")
    pv.add_argument("-n", "--examples", type=_count, default=3, help="examples shown per training source (default 3)")
    _eval_parser(sub)
    _compare_parser(sub)
    r = sub.add_parser("reward", help="score a response with a reward model",
                       description="Print the score a reward model (a run of task: reward) gives a response to a "
                       "prompt. Example: lmtune reward runs/reward --prompt 'Is 4 even?' --response 'Yes.'")
    r.add_argument("run_dir", help="a run directory from lmtune train with task: reward")
    r.add_argument("--prompt", required=True, help="the user message (rendered as in training)")
    r.add_argument("--response", required=True, help="the answer to score")
    m = sub.add_parser("merge", help="fold LoRA / IA3 into the base weights", description="Merge a run into its base "
                       "weights and save a plain transformers model directory.")
    m.add_argument("run_dir")
    m.add_argument("--out", required=True, help="output directory for the merged model")
    _export_parser(sub)
    s = sub.add_parser("studio", help="web page: configure, estimate, launch, watch, chat, compare",
                       description="Serve the lmtune studio, a local web page to configure a run (with its memory "
                       "estimate live), launch and watch it, stop it cleanly, chat with the result and compare runs. "
                       "Open the address it prints: its ?token= is this start's secret, and only a page opened with "
                       "it (from this machine's own address) can use the studio.")
    s.add_argument("--port", type=_port, default=7860, help="port to listen on (default 7860; 0 picks a free one)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--runs", default="runs", help="directory whose runs the page lists, and the only place it "
                   "launches, stops or chats with runs (default ./runs)")
    return p


def _count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: give a whole number >= 0")
    return int(text)


def _port(text: str) -> int:
    """argparse type: a TCP port number (0 lets the system pick one)."""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: give a number from 1 to 65535 (0 picks a free one)")
    return int(text)


def _eval_parser(sub) -> None:
    v = sub.add_parser("eval", help="score a run or a base model on a data file",
                       description="Score a trained run (or, with no RUN_DIR, a base model) on a data file. Metrics "
                       "follow from the records: text -> loss, perplexity; prompt + answer (prompt/completion, "
                       "instruction/output, text/label) -> also exact_match and accuracy (the answer comes first) of "
                       "the greedy answer; prompt/chosen/rejected -> preference_accuracy (chosen log-prob > "
                       "rejected). Prints JSON and writes it to --out (default RUN_DIR/eval.json).")
    v.add_argument("run_dir", nargs="?", help="a run / adapter directory from lmtune train or PEFT")
    v.add_argument("--model", help="base model when no RUN_DIR is given (default: SmolLM2-135M-Instruct)")
    v.add_argument("--data", required=True, help="data file (.jsonl, .json, .csv, .parquet, .txt)")
    v.add_argument("--metrics", help="comma-separated subset of loss, perplexity, accuracy, exact_match, "
                   "preference_accuracy (default: all the data gives)")
    v.add_argument("--normalize", help="applied to answers before comparing: comma-separated case, punctuation, "
                   "whitespace, articles, or none (default case,punctuation,whitespace)")
    v.add_argument("--max-new-tokens", type=int, help="tokens generated per answer (default: the reference "
                   "answer's length + 8)")
    v.add_argument("--out", help="JSON file to write, its directory created if missing (default RUN_DIR/eval.json; "
                   "none for a base model)")


def _compare_parser(sub) -> None:
    c = sub.add_parser("compare", help="train several methods on the same data and compare them",
                       description="Train each method on the config's data with the same step budget (one lmtune "
                       "train run each, under --out), score each and the untuned model on the first data.eval file, "
                       "and write report.md, report.json, eval_loss.png and methods.png. Learning rates start from a "
                       "per-method table; change any key for one method with methods.NAME.KEY=value (e.g. "
                       "methods.lora.train.lr=5e-4) or a `methods:` section in the YAML.")
    c.add_argument("config", nargs="?", help="YAML run config (data, model, train settings)")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every method, or "
                   "methods.NAME.KEY=value for one")
    c.add_argument("--methods", help="comma-separated methods (default: every registered method)")
    c.add_argument("--steps", type=int, help="optimizer steps per method (default: train.steps)")
    c.add_argument("--out", default="runs/compare", help="directory for the runs and the report "
                   "(default runs/compare)")
    c.add_argument("--max-new-tokens", type=int, help="tokens generated per answer when scoring (default: the "
                   "reference answer's length + 8)")
    c.add_argument("--normalize", help="answer normalisation for scoring, as in lmtune eval")


def _export_parser(sub) -> None:
    x = sub.add_parser("export", help="merge and write a GGUF file (llama.cpp, Ollama) + an Ollama Modelfile",
                       description="Merge a run into its base weights and write one GGUF file that llama.cpp, Ollama "
                       "and LM Studio load, with the tokenizer and chat template, plus an Ollama Modelfile beside it "
                       "(FROM, TEMPLATE, stop tokens; replaced if present). Llama, Mistral and Qwen2 models. With no "
                       "RUN_DIR, the base model. Example: lmtune export runs/quickstart --quant q8_0 --out quill.gguf "
                       "&& ollama create quill -f Modelfile")
    x.add_argument("run_dir", nargs="?", help="a run directory from lmtune train (LoRA, IA3, full, freeze) or a "
                   "transformers model directory")
    x.add_argument("--model", help="base model when no RUN_DIR is given (default: SmolLM2-135M-Instruct)")
    x.add_argument("--format", default="gguf", help="output format (default gguf, the only one)")
    x.add_argument("--quant", default="f16", help="weight type: f32, f16 (default) or q8_0")
    x.add_argument("--out", required=True, help="the .gguf file to write (must not exist)")


def _estimate_parser(sub) -> None:
    from lmtune.memory.cli import add_arguments

    e = sub.add_parser("estimate", help="predict a run's peak memory without loading weights",
                       description="Predict the peak memory of a training run from the model's config alone "
                       "(a training step traced on fake tensors): weights, gradients, optimizer states, "
                       "activations, overhead. Example: lmtune estimate examples/quickstart.yaml --seq-len 2048")
    add_arguments(e)


def _estimate(args: argparse.Namespace) -> None:
    from lmtune.memory.cli import run

    run(args)


def _load_target(args: argparse.Namespace):
    from lmtune.checkpoint import load
    from lmtune.models import load_model
    from lmtune.tuned import apply

    if args.run_dir:
        return load(args.run_dir)
    model, tokenizer = load_model(args.model)
    return apply(model, "full", base_name=args.model), tokenizer


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.exists(config):
        config, overrides = None, [config, *overrides]  # overrides only, no YAML
    return config, overrides


def _config(args: argparse.Namespace):
    from lmtune.config import load_config

    return load_config(*_config_and_overrides(args))


def _train(args: argparse.Namespace) -> None:
    cfg = _config(args)  # config mistakes surface before the slow training imports
    if args.print_launch:
        from lmtune.distributed import launch_commands

        print(launch_commands([a for a in (args.config, *args.overrides) if a], args.nodes, args.gpus, args.sharding))
        return
    from lmtune.train import run

    summary = run(cfg)
    print(f"done: {summary['steps']} steps, final loss {summary['loss']:.4f}"
          + (f", eval loss {summary['eval_loss']:.4f}" if "eval_loss" in summary else ""))


def _generate(args: argparse.Namespace) -> None:
    from lmtune.inference import generate

    tuned, tokenizer = _load_target(args)
    print(generate(tuned, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.raw))


def _chat(args: argparse.Namespace) -> None:
    from lmtune.inference import chat

    tuned, tokenizer = _load_target(args)
    if not tokenizer.chat_template:
        raise LmtuneError("this model's tokenizer has no chat template; use lmtune generate --raw instead")
    chat(tuned, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature)


def _data(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from lmtune.data.preview import preview
    from lmtune.models import load_tokenizer

    print(preview(cfg, load_tokenizer(cfg.model.name, cfg.model.trust_remote_code), args.examples))


def _eval(args: argparse.Namespace) -> None:
    import json

    from lmtune.evaluation import data_settings, evaluate_file, on_device, parse_normalize

    steps = parse_normalize(args.normalize)  # argument mistakes before the model loads
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    out = args.out or (os.path.join(args.run_dir, "eval.json") if args.run_dir else None)
    if out:
        check_new_path(Path(out), "--out", directory=False)
    tuned, tokenizer = _load_target(args)
    tuned = on_device(tuned)
    result = {"run": args.run_dir, "model": tuned.base_name if args.run_dir else (args.model or "default"),
              **evaluate_file(tuned, tokenizer, args.data, metrics, data_settings(args.run_dir), steps,
                              args.max_new_tokens)}
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{out}.tmp-{os.getpid()}")
        tmp.write_text(text + "\n")
        os.replace(tmp, out)  # a failed write leaves no torn JSON behind
    print(text)


def _compare(args: argparse.Namespace) -> None:
    from lmtune.compare import compare
    from lmtune.evaluation import parse_normalize

    check_new_path(Path(args.out), "--out")
    config, overrides = _config_and_overrides(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    compare(config, overrides, methods, args.steps, args.out, args.max_new_tokens, parse_normalize(args.normalize))
    print(f"report written to {os.path.join(args.out, 'report.md')}")


def _reward(args: argparse.Namespace) -> None:
    from lmtune.tasks.reward import score_run

    print(f"{score_run(args.run_dir, args.prompt, args.response):.4f}")


def _merge(args: argparse.Namespace) -> None:
    from lmtune.checkpoint import merge_to

    merge_to(args.run_dir, args.out)
    print(f"merged model written to {args.out}")


def _export(args: argparse.Namespace) -> None:
    from lmtune.export import export

    modelfile = export(args.run_dir, args.out, args.format, args.quant, args.model)
    print(f"GGUF written to {args.out}; Ollama: ollama create NAME -f {modelfile}")


def _studio(args: argparse.Namespace) -> None:
    from lmtune.studio.server import serve

    check_new_path(Path(args.runs), "--runs")
    serve(args.host, args.port, Path(args.runs))


COMMANDS = {"train": _train, "estimate": _estimate, "generate": _generate, "chat": _chat, "merge": _merge,
            "data": _data, "eval": _eval, "compare": _compare, "studio": _studio, "reward": _reward,
            "export": _export}


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="lmtune: %(message)s")
    logging.getLogger("lmtune").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    configure_allocator()  # before torch allocates anything: freed tensor memory goes back to the kernel
    parser = _parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not (isinstance(getattr(args, "overrides", None), list) and all("=" in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # key=value overrides written after an option (`compare x.yaml --steps 4 train.lr=1e-3`)
        args.overrides += extra
    try:
        _quiet_libraries()
        COMMANDS[args.command](args)
    except LmtuneError as err:
        print(f"lmtune: error: {err}", file=sys.stderr)
        return 2
    except (OSError, UnicodeError) as err:  # a path the user gave that cannot be read or written, wherever met
        print(f"lmtune: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # a training run stopped by a signal says where its checkpoint is
        print(f"lmtune: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
