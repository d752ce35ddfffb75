"""The ``sfa-compile`` command line. Subcommands read their defaults from SFAConfig and the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_demo, run_demo

    identity_error, rows = run_demo(length=args.length, head_dim=args.head_dim)
    print(format_demo(identity_error, rows, args.head_dim))
    return 0


def _load_dense(model_dir: str):
    import transformers

    from .conversion.checkpoint import architecture_class

    config = transformers.AutoConfig.from_pretrained(model_dir)
    cls = architecture_class(getattr(config, "architectures", None), transformers.AutoModel)
    return cls.from_pretrained(model_dir), config


def _check_output(path: str, force: bool) -> None:
    if Path(path).exists() and not force:
        raise SystemExit(f"sfa-compile: {path} already exists; pass --force to overwrite it")


def _convert(args: argparse.Namespace) -> int:
    from . import convert, save
    from .config import SFAConfig
    from .conversion.textdata import text_examples

    _check_output(args.output, args.force)  # before any expensive work
    config = SFAConfig(topk=args.topk, layers=args.layers)
    model, hf_config = _load_dense(args.model_dir)
    calibration = text_examples(args.model_dir, hf_config, args.calibrate) if args.calibrate else None
    convert(model.eval(), config, calibration, refine_steps=args.refine_steps)
    save(model, args.output, force=args.force)
    sfa = model.config.sfa
    print(f"converted {len(sfa['converted_layers'])} attention layers (topk {args.topk}, projection "
          f"{sfa['projection']}{', calibrated on %d sentences' % args.calibrate if args.calibrate else ''}) "
          f"-> {args.output}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from . import finetune, load, save
    from .conversion.textdata import text_examples

    _check_output(args.output, args.force)
    model = load(args.model_dir)
    causal_lm = type(model).__name__.endswith("ForCausalLM")
    data = text_examples(args.model_dir, model.config, args.sentences, labels=causal_lm)
    task = (lambda out, example: out.loss) if causal_lm else None
    losses = finetune(model, data, args.steps, lr=args.lr, model_lr=args.model_lr, lam=args.lam, task_loss=task,
                      train_model=args.train_model, straight_through=args.straight_through,
                      sparsity_weight=args.sparsity_weight, warmup_topks=args.warmup_topks,
                      final_lr_factor=args.final_lr_factor)
    save(model, args.output, force=args.force)
    print(f"fine-tuned {args.steps} steps (loss {losses[0]:.4f} -> {losses[-1]:.4f}) -> {args.output}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import inspect

    import torch

    from . import export_onnx, load
    from .exporters.onnx_export import flash_sfa_nodes

    _check_output(args.output, args.force)
    model = load(args.model_dir)
    parameters = inspect.signature(model.forward).parameters
    if "input_ids" not in parameters or not getattr(model.config, "vocab_size", 0):
        raise SystemExit(f"sfa-compile: export builds token-id example inputs; {type(model).__name__} takes other "
                         "inputs: call sfa_compile.export_onnx(model, args, path, kwargs=...) with your own")
    model.config.use_cache = False  # the exported graph computes outputs, not a KV cache
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, model.config.vocab_size, (args.batch, args.length), generator=generator)}
    if "attention_mask" in parameters:
        inputs["attention_mask"] = torch.ones(args.batch, args.length, dtype=torch.long)
    onnx_model = export_onnx(model, (), args.output, kwargs=inputs, opset=args.opset)
    print(f"exported {len(flash_sfa_nodes(onnx_model))} FlashSFA nodes (inputs: {', '.join(inputs)}; batch and "
          f"sequence length dynamic) -> {args.output}")
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
        raise SystemExit(f"sfa-compile: {exc}") from None
    return 0


def _finetune_defaults():
    import inspect

    from .training.finetune import finetune

    return inspect.signature(finetune).parameters


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfa-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="SFA vs dense attention on a built-in default problem (no downloads)")
    demo.add_argument("--length", type=int, default=512, help="sequence length (default: 512)")
    demo.add_argument("--head-dim", type=int, default=64, choices=[32, 64, 128], help="head dim (default: 64)")
    demo.set_defaults(func=_demo)

    from .config import SFAConfig

    defaults = SFAConfig()
    tuning = _finetune_defaults()
    conv = sub.add_parser("convert", help="convert a Hugging Face model directory into an SFA checkpoint")
    conv.add_argument("model_dir", help="directory with config.json and weights (save_pretrained layout)")
    conv.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    conv.add_argument("--topk", type=int, default=defaults.topk, help=f"features kept (default: {defaults.topk})")
    conv.add_argument("--layers", default=defaults.layers, help="regex over module paths of layers to convert")
    conv.add_argument("--calibrate", type=int, default=0, metavar="N",
                      help="fit projections on N built-in sentences (default: 0, plain top-k)")
    conv.add_argument("--refine-steps", type=int, default=0, help="Eq. 8 refinement steps after calibration")
    conv.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    conv.set_defaults(func=_convert)

    tune = sub.add_parser("finetune", help="fine-tune an SFA checkpoint with the Eq. 8 loss on built-in text")
    tune.add_argument("model_dir", help="SFA checkpoint directory (from sfa-compile convert)")
    tune.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    tune.add_argument("--steps", type=int, default=100)
    tune.add_argument("--sentences", type=int, default=256, help="built-in sentences to train on")
    tune.add_argument("--lr", type=float, default=tuning["lr"].default, help="learning rate of the projections")
    tune.add_argument("--model-lr", type=float, default=tuning["model_lr"].default,
                      help="learning rate of the model's weights")
    tune.add_argument("--lam", type=float, default=tuning["lam"].default, help="weight of the Eq. 8 distillation term")
    tune.add_argument("--train-model", action="store_true", help="also train the model's own weights")
    tune.add_argument("--straight-through", action="store_true",
                      help="straight-through top-k gradients: dropped features learn whether to enter the kept set")
    tune.add_argument("--sparsity-weight", type=float, default=tuning["sparsity_weight"].default,
                      help="weight of the penalty on the energy top-k drops (default: %(default)s)")
    tune.add_argument("--warmup-topks", type=int, nargs="+", default=tuning["warmup_topks"].default, metavar="K",
                      help="gradual sparsification: larger top-k values for the first steps (e.g. 16 12 for topk 8)")
    tune.add_argument("--final-lr-factor", type=float, default=tuning["final_lr_factor"].default,
                      help="learning rates times this for the last quarter of the steps (default: %(default)s)")
    tune.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    tune.set_defaults(func=_finetune)

    export = sub.add_parser("export", help="export an SFA checkpoint to ONNX (com.sfa::FlashSFA nodes)")
    export.add_argument("model_dir", help="SFA checkpoint directory (from sfa-compile convert)")
    export.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    export.add_argument("--batch", type=int, default=2, help="batch of the example input (stays dynamic)")
    export.add_argument("--length", type=int, default=16, help="length of the example input (stays dynamic)")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's, >= 18)")
    export.add_argument("--force", action="store_true", help="overwrite an existing output file")
    export.set_defaults(func=_export)

    plugin = sub.add_parser("build-plugin", help="build the FlashSFA ONNX Runtime plugin; prints its path")
    plugin.add_argument("--include-dir", help="ONNX Runtime include directory (default: $SFA_ORT_INCLUDE, then "
                        "fetched or system headers)")
    plugin.add_argument("--fetch-headers", action="store_true",
                        help="if no headers are found, download Debian's libonnxruntime-dev into the cache first")
    plugin.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    plugin.set_defaults(func=_build_plugin)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
