"""Command-line arguments of the recipes (next to ``TrainingArguments``) and their checks.

Every check here runs before any data is loaded or any model is trained, and fails with a
``ValueError`` that names the argument.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "RecipeArguments",
    "PaperSchedule",
    "TrainingSchedule",
    "check_model_name",
    "pruned_by_default",
    "check_image_size",
    "min_image_size",
    "parse_windows",
    "parse_epochs",
    "rescale_windows",
    "resolve_schedule",
    "validate_recipe_arguments",
    "check_training_arguments",
    "recipe_help",
    "final_feature_size",
    "build_selector",
    "check_export_dir",
    "resolve_checkpoint",
    "check_checkpoint_unfinished",
    "check_checkpoint_finished",
    "load_finished_run",
    "ddp_for_pruning",
    "keep_resumed_windows",
]

Window = Tuple[int, int]
logger = logging.getLogger(__name__)


@dataclass
class RecipeArguments:
    """Our arguments; everything about the training loop itself is in ``transformers.TrainingArguments``.

    Fields left at ``None`` take the recipe's paper default (see each recipe's ``PAPER_SCHEDULE``).
    """

    model: str = field(
        default="ela_resnet50",
        metadata={"help": "A model registered by ela_hf (ela_*, ela_l_*, mrla_l_*, mrla_b_*, plain resnet*_cifar)."},
    )
    dataset: Optional[str] = field(
        default=None,
        metadata={
            "help": "A Hub dataset id, a local folder (class sub-folders of images, or parquet files), a .parquet "
            "file, or 'sklearn:digits' (embedded in scikit-learn; works offline)."
        },
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    image_column: Optional[str] = field(default=None, metadata={"help": "Image column (default: detected)."})
    label_column: Optional[str] = field(default=None, metadata={"help": "Label column (default: detected)."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: Optional[str] = field(
        default=None, metadata={"help": "Evaluation split (default: the first of validation, valid, val, test)."}
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of the training split held out when there is no evaluation split."}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use only this many training images."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use only this many evaluation images."})
    check_images: str = field(
        default="eval",
        metadata={
            "help": "Decode these splits' images once before training and stop, naming every unreadable file: "
            "'eval' (default: the evaluation split is otherwise first read after a training epoch), 'all' (the "
            "training split too), or 'none'.",
            "choices": ["eval", "all", "none"],
        },
    )
    image_size: Optional[int] = field(
        default=None, metadata={"help": "Input size in pixels (default: the model's data config: 224 or 32)."}
    )
    hflip: float = field(default=0.5, metadata={"help": "Probability of a horizontal flip in training."})
    drop_path_rate: float = field(
        default=0.2, metadata={"help": "Drop path (stochastic depth) on the attention branch."}
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    lr_batch_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "--learning_rate is given for this total batch size and scaled linearly to the actual one "
            "(ImageNet recipe: 256). 0 or unset: --learning_rate is used as it is."
        },
    )
    warmup_epochs: Optional[float] = field(
        default=None, metadata={"help": "Linear warm-up epochs (default: the paper's, rescaled to the epochs)."}
    )
    lr_decay_epochs: Optional[str] = field(
        default=None,
        metadata={"help": "Comma-separated epochs after which the lr drops (default: the paper's, rescaled)."},
    )
    lr_decay_rate: float = field(default=0.1, metadata={"help": "Factor applied to the lr at each decay epoch."})
    kl_windows: Optional[str] = field(
        default=None,
        metadata={
            "help": "ELA pruning windows, 1-indexed inclusive ranges in --window_unit, e.g. '1-3,45-48,91-93'; "
            "'none' trains without pruning (default: the paper's, rescaled to the epochs)."
        },
    )
    window_unit: str = field(default="epoch", metadata={"help": "Unit of --kl_windows: 'epoch' or 'step'."})
    ebqm_q: Optional[float] = field(default=None, metadata={"help": "EBQM quantile q (default: the preset's)."})
    ebqm_alpha: Optional[float] = field(default=None, metadata={"help": "EBQM Beta alpha (default: the preset's)."})
    ebqm_beta: Optional[float] = field(default=None, metadata={"help": "EBQM Beta beta (default: the preset's)."})
    ebqm_tau: Optional[float] = field(default=None, metadata={"help": "EBQM threshold tau (default: the preset's)."})
    export_dir: Optional[str] = field(
        default=None, metadata={"help": "Where the slim, Hub-ready export goes (default: <output_dir>/export)."}
    )
    export_only: bool = field(
        default=False,
        metadata={"help": "Train nothing: evaluate the finished run's checkpoint (--resume_from_checkpoint, e.g. "
                          "last), then export (and with --push_to_hub push) it with its model card, e.g. after a "
                          "run stopped during its final evaluation or export. Give the run's own arguments: the "
                          "card describes them, and the checkpoint must have trained all of the run's steps."},
    )


@dataclass(frozen=True)
class PaperSchedule:
    """A recipe's schedule as the paper states it, in epochs of a run of ``epochs`` epochs.

    ``name`` says whose schedule it is in the log (a demo's shortened schedule is rescaled the same way).
    """

    epochs: int
    lr_decay_epochs: Tuple[float, ...]
    warmup_epochs: float
    kl_windows: Tuple[Window, ...]
    name: str = "the paper's"


@dataclass
class TrainingSchedule:
    """The schedule of this run: epochs, optimizer steps, lr milestones and the pruning windows."""

    num_epochs: int
    steps_per_epoch: Optional[int]
    lr_decay_epochs: List[float]
    warmup_epochs: float
    kl_windows: List[Window]
    window_unit: str
    rescaled_from: Optional[int] = None
    rescaled_name: str = "the paper's"
    # the run's length in epochs, fractional with --max_steps or a fractional --num_train_epochs (num_epochs
    # is that rounded up: the epochs that at least start); None while the steps per epoch are unknown
    run_epochs: Optional[float] = None
    max_steps: int = -1  # --max_steps (the run's length when positive)

    @property
    def total_steps(self) -> Optional[int]:
        return None if self.steps_per_epoch is None else self.num_epochs * self.steps_per_epoch

    @property
    def run_steps(self) -> Optional[int]:
        """The optimizer steps the run takes (as the Trainer counts them: ``max_steps``, or the epochs' steps
        rounded up); None while the steps per epoch are unknown."""
        if self.steps_per_epoch is None:
            return None
        if self.max_steps > 0:
            return self.max_steps
        if self.run_epochs is None:
            return self.total_steps
        return math.ceil(self.run_epochs * self.steps_per_epoch)  # the Trainer's own formula

    def describe(self) -> str:
        windows = ", ".join(f"{s}-{e}" for s, e in self.kl_windows) or "none"
        decay = ", ".join(f"{e:g}" for e in self.lr_decay_epochs) or "none"
        length = self.num_epochs if self.run_epochs is None else f"{self.run_epochs:g}"
        text = (
            f"{length} epochs; warm-up {self.warmup_epochs:g} epochs; lr decay after epochs {decay}; "
            f"KL windows ({self.window_unit}s) {windows}"
        )
        if self.rescaled_from is not None:
            text += f" ({self.rescaled_name} {self.rescaled_from}-epoch schedule, rescaled)"
        return text


def pruned_by_default(name: str) -> bool:
    """Whether the recipes prune ``name`` with the paper's KL windows when ``--kl_windows`` is not given:
    the ELA models (``ela_*``); the ``mrla_*`` baselines and plain ResNets train unpruned."""
    return name.startswith("ela_")


def check_model_name(name: str) -> None:
    from ela_hf.models import MODEL_ARGS

    if name not in MODEL_ARGS:
        close = difflib.get_close_matches(name, list(MODEL_ARGS), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known models: {', '.join(sorted(MODEL_ARGS))}"
        raise ValueError(f"--model {name!r} is not a model registered by ela_hf{hint}")


def _stride_steps(name: str) -> int:
    """The model's stride-2 steps: two in the ImageNet stems (conv, max-pool), one per stage after the first."""
    from ela_hf.models import MODEL_ARGS

    args = MODEL_ARGS[name]
    return len(args["layers"]) - 1 + (0 if args.get("stem_type") == "cifar" else 2)


def min_image_size(name: str) -> int:
    """The model's total stride: a smaller input leaves its last stage less than one pixel of real image."""
    return 2 ** _stride_steps(name)


def final_feature_size(name: str, image_size: int) -> int:
    """Side of the last stage's feature map for ``image_size`` inputs (every stride-2 step rounds up)."""
    for _ in range(_stride_steps(name)):
        image_size = -(-image_size // 2)
    return image_size


def check_image_size(name: str, image_size: Optional[int]) -> None:
    if image_size is None:
        return
    smallest = min_image_size(name)
    if image_size < smallest:
        raise ValueError(
            f"--image_size {image_size} is too small for {name}: its total stride is {smallest}, so images must be "
            f"at least {smallest}x{smallest} pixels"
        )


def parse_windows(text: Optional[str]) -> Optional[List[Window]]:
    """``"1-3,45-48"`` -> ``[(1, 3), (45, 48)]``; ``"5"`` is ``(5, 5)``; ``"none"`` -> ``[]``; None -> None."""
    if text is None:
        return None
    if text.strip().lower() in ("none", ""):
        return []
    windows = []
    for part in text.split(","):
        bounds = part.strip().split("-")
        try:
            if len(bounds) == 1:
                start = end = int(bounds[0])
            elif len(bounds) == 2:
                start, end = int(bounds[0]), int(bounds[1])
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"--kl_windows {text!r}: {part.strip()!r} is not a range like '45-48'") from None
        if start < 1 or end < start:
            raise ValueError(f"--kl_windows {text!r}: window {start}-{end} must satisfy 1 <= start <= end (1-indexed)")
        windows.append((start, end))
    _check_disjoint(windows, f"--kl_windows {text!r}")
    return windows


def parse_epochs(text: Optional[str]) -> Optional[List[float]]:
    if text is None:
        return None
    if text.strip().lower() in ("none", ""):
        return []
    try:
        epochs = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--lr_decay_epochs {text!r} is not a comma-separated list of epochs") from None
    if not all(math.isfinite(e) and e > 0 for e in epochs) or any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise ValueError(f"--lr_decay_epochs {text!r} must be finite, positive and strictly increasing")
    return epochs


def rescale_windows(windows: Sequence[Window], from_epochs: int, to_epochs: int) -> List[Window]:
    """Map 1-indexed inclusive epoch windows of a ``from_epochs`` run onto a ``to_epochs`` run.

    A window covering epochs ``(s-1, e]`` of the paper's run covers ``(round((s-1)r), round(e r)]`` of
    this one (``r = to/from``), and at least one epoch.
    """
    ratio = to_epochs / from_epochs
    out = []
    for start, end in windows:
        new_start = min(max(1, round((start - 1) * ratio) + 1), to_epochs)
        out.append((new_start, min(max(new_start, round(end * ratio)), to_epochs)))
    return out


def _check_disjoint(windows: Sequence[Window], what: str) -> None:
    for (s0, e0), (s1, e1) in zip(windows, windows[1:]):
        if s1 <= e0:
            raise ValueError(f"{what}: windows {s0}-{e0} and {s1}-{e1} overlap or are out of order")


def resolve_schedule(
    paper: PaperSchedule, args: RecipeArguments, num_train_epochs: float, max_steps: int = -1,
    steps_per_epoch: Optional[int] = None, has_attention: bool = True, pruned_by_default: bool = True,
) -> TrainingSchedule:
    """This run's schedule: the paper's, rescaled to the run's epochs, with any explicit argument winning.

    The run's epochs are ``ceil(num_train_epochs)``, or, with ``max_steps > 0`` (as in the Trainer),
    ``ceil(max_steps / steps_per_epoch)``; while ``steps_per_epoch`` is unknown only what can be checked
    without it is. Windows that do not fit into the run raise ``ValueError``.
    """
    if args.window_unit not in ("epoch", "step"):
        raise ValueError(f"--window_unit must be 'epoch' or 'step', got {args.window_unit!r}")
    if max_steps > 0:
        run_epochs = max_steps / steps_per_epoch if steps_per_epoch else None
    else:
        if num_train_epochs <= 0:
            raise ValueError(f"--num_train_epochs must be positive, got {num_train_epochs}")
        run_epochs = float(num_train_epochs)
    num_epochs = math.ceil(run_epochs) if run_epochs is not None else None
    # windows are whole epochs: rescaled to the epochs that start; lr milestones and warm-up to the run's
    # actual length (1.4 epochs of a 100-epoch schedule: decays after 0.42, 0.84, 1.26)
    rescale = num_epochs is not None and num_epochs != paper.epochs
    lr_rescale = run_epochs is not None and run_epochs != paper.epochs
    ratio = run_epochs / paper.epochs if lr_rescale else 1.0

    explicit_windows = parse_windows(args.kl_windows)
    if explicit_windows is not None:
        windows = explicit_windows
    elif args.window_unit == "step":
        raise ValueError(f"--window_unit step needs --kl_windows ({paper.name} windows are in epochs)")
    elif not has_attention or not pruned_by_default:
        windows = []  # a plain ResNet, or an MRLA baseline (mrla_*) trained as it is unless windows are given
    elif rescale:
        windows = rescale_windows(paper.kl_windows, paper.epochs, num_epochs)
        try:
            _check_disjoint(windows, "")
        except ValueError:
            raise ValueError(
                f"{paper.name} KL windows {_fmt(paper.kl_windows)} (for {paper.epochs} epochs) do not fit into "
                f"{num_epochs} epochs; pass --kl_windows (e.g. '1-1'), or --window_unit step with step windows"
            ) from None
    else:
        windows = list(paper.kl_windows)
    if windows and not has_attention:
        raise ValueError(f"--kl_windows given, but --model {args.model} has no attention layers to prune")

    decay = parse_epochs(args.lr_decay_epochs)
    if decay is None:
        decay = [e * ratio for e in paper.lr_decay_epochs]
    elif steps_per_epoch is not None and run_epochs is not None and any(e >= run_epochs for e in decay):
        # said once, when the schedule is final (the recipes call this again after loading the data)
        logger.warning(
            "--lr_decay_epochs %s: a decay at epoch %s never happens, the run has %g epochs",
            args.lr_decay_epochs, ", ".join(f"{e:g}" for e in decay if e >= run_epochs), run_epochs,
        )
    warmup = args.warmup_epochs if args.warmup_epochs is not None else paper.warmup_epochs * ratio
    if not (math.isfinite(warmup) and warmup >= 0):
        raise ValueError(f"--warmup_epochs must be finite and >= 0, got {warmup}")

    # say "rescaled" only when a paper value was actually moved
    rescaled = (rescale and explicit_windows is None and windows != list(paper.kl_windows)) or (lr_rescale and (
        (args.lr_decay_epochs is None and bool(paper.lr_decay_epochs))
        or (args.warmup_epochs is None and paper.warmup_epochs > 0)
    ))
    schedule = TrainingSchedule(
        num_epochs=num_epochs if num_epochs is not None else paper.epochs,
        steps_per_epoch=steps_per_epoch,
        lr_decay_epochs=decay,
        warmup_epochs=warmup,
        kl_windows=windows,
        window_unit=args.window_unit,
        rescaled_from=paper.epochs if rescaled else None,
        rescaled_name=paper.name,
        run_epochs=run_epochs if steps_per_epoch is not None or max_steps <= 0 else None,
        max_steps=max_steps,
    )
    if steps_per_epoch is not None and run_epochs is not None and warmup > 0:
        # in whole optimizer steps, rounded as StepScheduleWithWarmup does
        warmup_steps = int(round(warmup * steps_per_epoch))
        if warmup_steps > schedule.run_steps:
            logger.warning(
                "--warmup_epochs %g is longer than the run (%g epochs): the learning rate never reaches its full "
                "value", warmup, run_epochs,
            )
        elif warmup_steps == 0:
            logger.warning("a warm-up of %g epochs is less than half an optimizer step (%d per epoch): none happens",
                           warmup, steps_per_epoch)
    if windows:
        last = windows[-1][1]
        if args.window_unit == "epoch" and num_epochs is not None and last > num_epochs:
            raise ValueError(
                f"KL window {windows[-1][0]}-{last} ends after the last epoch: the run has {num_epochs} epochs"
            )
        total = schedule.total_steps if max_steps <= 0 else max_steps
        if args.window_unit == "step" and steps_per_epoch is not None and last > total:
            raise ValueError(f"KL window {windows[-1][0]}-{last} ends after the last step: the run has {total} steps")
    return schedule


def validate_recipe_arguments(args: RecipeArguments) -> None:
    """Checks that need neither data nor a model; called first thing, so bad arguments cost nothing."""
    from ela_hf.models import MODEL_ARGS

    check_model_name(args.model)
    check_image_size(args.model, args.image_size)
    if args.dataset is None:
        raise ValueError("--dataset is required (a Hub id, a local folder, a .parquet file, or 'sklearn:digits')")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    if not 0.0 <= args.hflip <= 1.0:
        raise ValueError(f"--hflip is a probability in [0, 1], got {args.hflip}")
    if not 0.0 <= args.drop_path_rate < 1.0:
        raise ValueError(f"--drop_path_rate must be in [0, 1), got {args.drop_path_rate}")
    if not 0.0 <= args.momentum < 1.0:
        raise ValueError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.lr_batch_size is not None and args.lr_batch_size < 0:
        raise ValueError(f"--lr_batch_size must be positive (or 0: no scaling), got {args.lr_batch_size}")
    if not 0.0 < args.lr_decay_rate <= 1.0:
        raise ValueError(f"--lr_decay_rate must be in (0, 1], got {args.lr_decay_rate}")
    if MODEL_ARGS[args.model]["attn_type"] is None and any(
        getattr(args, f"ebqm_{p}") is not None for p in ("q", "alpha", "beta", "tau")
    ):
        raise ValueError(f"--ebqm_* given, but --model {args.model} has no attention layers to prune")


# TrainingArguments the recipes do not use: they build the paper's SGD and step schedule themselves
_REPLACED_OPTIONS = {
    "optim": "the recipes train with the paper's SGD (--momentum, --weight_decay, --learning_rate)",
    "optim_args": "the recipes train with the paper's SGD (--momentum, --weight_decay, --learning_rate)",
    "lr_scheduler_type": "the recipes use the paper's step schedule (--lr_decay_epochs, --lr_decay_rate)",
    "lr_scheduler_kwargs": "the recipes use the paper's step schedule (--lr_decay_epochs, --lr_decay_rate)",
    "warmup_steps": "the recipes warm up by epochs (--warmup_epochs)",
    "warmup_ratio": "the recipes warm up by epochs (--warmup_epochs)",
}


_EXPORT_ONLY_NEEDS_A_CHECKPOINT = ("--export_only exports a finished run's checkpoint: name it with "
                                   "--resume_from_checkpoint <folder> (or last, for the newest in --output_dir)")


def check_training_arguments(
    args: RecipeArguments, training_args, default_image_size: int, argv: Optional[Sequence[str]] = None
) -> None:
    """Checks of ``TrainingArguments`` against the recipe, before any data is loaded.

    - Options the recipe would silently ignore (``--optim``, ``--lr_scheduler_type``, ``--warmup_steps``, ...) are
      refused when given on the command line (``argv``; default ``sys.argv[1:]``), naming the recipe's own
      arguments.
    - Where the last stage is 1x1 (small ``--image_size``), a batch of one image leaves batch norm one value per
      channel, which PyTorch refuses in training: ``--per_device_train_batch_size 1`` is refused (and
      :func:`~ela_hf.training.data.avoid_single_image_batch` keeps an epoch's last batch from holding one image).
    - ``--push_to_hub`` needs a token (``--hub_token``, ``HF_TOKEN`` or ``hf auth login``): checked now, not after
      training.
    - Batch sizes and ``--gradient_accumulation_steps`` must be at least 1.
    - ``--do_eval`` without ``--do_train`` (or ``--do_train False``) is refused: the recipes always train, then
      evaluate (``--export_only`` evaluates and exports a finished checkpoint); ``--do_predict`` is refused.
    - ``--export_only`` needs ``--resume_from_checkpoint``.
    """
    import dataclasses
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    options = {f.name for cls in (type(args), type(training_args)) for f in dataclasses.fields(cls)}
    given = set()
    for arg in argv:
        if not arg.startswith("--"):
            continue
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        matches = [n for n in options if n.startswith(key)]  # argparse also takes an unambiguous prefix
        name = key if key in options else matches[0] if len(matches) == 1 else None
        given.add(name)
        if name in _REPLACED_OPTIONS:
            raise ValueError(f"--{name} is not used: {_REPLACED_OPTIONS[name]}; write your own Trainer script with "
                             "ela_hf.ElaPruningCallback for another one")
    # transformers' example scripts run only the stages named by --do_train/--do_eval/--do_predict; the recipes
    # always train, then evaluate on --eval_split. `--do_train [--do_eval]` (copied from such a command) is what
    # they do; --do_eval without training (to evaluate a checkpoint) must not start a training run
    if "do_predict" in given and training_args.do_predict:
        raise ValueError("--do_predict is not used: the recipes evaluate on --eval_split (top-1/top-5) after training")
    if ({"do_train", "do_eval"} & given) and not training_args.do_train:
        raise ValueError(
            "the recipes always train and then evaluate (--do_train --do_eval); to evaluate and export a finished "
            "run's checkpoint, add --export_only --resume_from_checkpoint <checkpoint>; to evaluate any checkpoint "
            "without training, load it with ElaForImageClassification.from_pretrained or "
            "pipeline('image-classification', ...) (see the README's transformers section)"
        )
    if args.export_only and training_args.resume_from_checkpoint is None:
        raise ValueError(_EXPORT_ONLY_NEEDS_A_CHECKPOINT)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(training_args, name)}")
    for name in ("learning_rate", "weight_decay"):  # NaN would train NaN weights for the whole run
        value = float(getattr(training_args, name))
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name} must be a finite number >= 0, got {value}")
    size = args.image_size or default_image_size
    if final_feature_size(args.model, size) == 1:
        if training_args.per_device_train_batch_size < 2:
            raise ValueError(
                f"--per_device_train_batch_size 1 with {args.model} at {size}x{size}: its last stage is 1x1, so a batch "
                "of one image leaves batch norm a single value per channel, which training cannot normalise; use a "
                "batch of 2 or more, or a larger --image_size"
            )
    if training_args.push_to_hub and not training_args.hub_token:
        from huggingface_hub import get_token

        if not get_token():
            raise ValueError("--push_to_hub needs a Hugging Face token: pass --hub_token, set HF_TOKEN, or run "
                             "`hf auth login` (checked before training, so the run is not lost at the end)")


def recipe_help(parser) -> None:
    """``--help`` texts of the ``TrainingArguments`` options whose meaning the recipes change or refuse."""
    texts = {
        "--resume_from_checkpoint": "A Trainer checkpoint folder, or 'last' for the newest complete checkpoint-* in "
        "--output_dir (pruning state included).",
        "--push_to_hub": "Push the slim release (model card included) to --hub_model_id once, at the end; training "
        "checkpoints are not pushed.",
    }
    texts.update({f"--{name}": f"Not used by the recipes (refused): {why}." for name, why in _REPLACED_OPTIONS.items()})
    for action in parser._actions:
        for option in action.option_strings:
            name = "--" + option[2:].replace("-", "_")  # --resume-from-checkpoint too
            if name in texts:
                action.help = texts[name]


def build_selector(args: RecipeArguments, preset):
    """The recipe's EBQM selector: each ``--ebqm_*`` where given, else the preset's value.

    Built before any data is loaded; a bad value raises ``ValueError`` naming its argument.
    """
    from ela_hf.pruning import EbqmSelector

    values = {}
    for name in ("q", "alpha", "beta", "tau"):
        given = getattr(args, f"ebqm_{name}")
        values[name] = getattr(preset, name) if given is None else given
    try:
        return EbqmSelector(**values)
    except ValueError as err:
        name = str(err).split(" ", 1)[0]
        flag = f"--ebqm_{name}" if name in values else "--ebqm_*"
        raise ValueError(f"{flag}: {err}") from None


def check_export_dir(export_dir: Optional[str], output_dir: str) -> None:
    """The slim export replaces its folder (``--export_dir``, default ``<output_dir>/export``): it must not be
    ``--output_dir`` or a folder containing it, and an existing folder must be an earlier export (checked now,
    not after training)."""
    from pathlib import Path

    from ela_hf.hub import _check_replaceable

    if export_dir:
        export_path, output_path = os.path.realpath(export_dir), os.path.realpath(output_dir)
        if os.path.commonpath([export_path, output_path]) == export_path:
            raise ValueError(
                f"--export_dir {export_dir!r} is --output_dir {output_dir!r} or contains it; the export replaces its "
                "folder and would delete the training output (checkpoints, trainer_state.json). Choose another "
                f"folder, e.g. {os.path.join(output_dir, 'export')!r} (the default)"
            )
        inside = os.path.relpath(export_path, output_path).split(os.sep)[0]
        if re.fullmatch(r"checkpoint-\d+|runs", inside):
            raise ValueError(
                f"--export_dir {export_dir!r} lies in {inside!r} of --output_dir, which the Trainer writes (and "
                "rotates) during training; choose another folder, e.g. the default "
                f"{os.path.join(output_dir, 'export')!r}"
            )
    target = export_dir or os.path.join(output_dir, "export")
    try:
        _check_replaceable(Path(target), overwrite=True)
    except FileExistsError as err:
        raise ValueError(f"--export_dir {target!r}: {err}") from None


def _fmt(windows: Sequence[Window]) -> str:
    return ", ".join(f"{s}-{e}" for s, e in windows)


def resolve_checkpoint(training_args, model: Optional[str] = None) -> Optional[str]:
    """The checkpoint folder of ``--resume_from_checkpoint``: a path, or ``last`` for the newest
    ``checkpoint-*`` in ``--output_dir`` that is complete (has ``trainer_state.json``). None when not resuming.
    With ``model``, a checkpoint of another architecture (its ``config.json``) is refused."""
    checkpoint = _resolve_checkpoint(training_args)
    if checkpoint is not None and model is not None:
        config = _read_json(os.path.join(checkpoint, "config.json"))
        saved = config.get("architecture") if config is not None else None
        if saved is not None and saved != model:
            raise ValueError(
                f"--resume_from_checkpoint {checkpoint!r} holds a {saved} (its config.json), not the --model {model}; "
                f"resume with --model {saved}, or start a fresh run"
            )
    return checkpoint


# card settings a resume compares elsewhere: the seed and dataset above; StepLR warns about another learning
# rate, schedule, momentum or weight decay when it loads the checkpoint's; ElaPruningCallback refuses other windows
# or another selector. The rest (run length, total batch size, drop path, ...) differs with one warning here.
_COMPARED_ELSEWHERE = frozenset(
    {"seed", "dataset", "learning_rate", "lr_schedule", "optimizer", "weight_decay", "kl_windows", "selector"}
)


def check_checkpoint_unfinished(checkpoint: Optional[str], run_steps: Optional[int],
                                settings: Optional[Dict[str, Any]] = None) -> None:
    """A checkpoint that already ran all of this run's ``run_steps`` optimizer steps: the Trainer would train one
    step past the end and replace the finished run's metrics, so it is refused (raise the run's length).

    With ``settings`` (this run's :func:`card_settings`) and a checkpoint that records its own
    (``run_settings.json``): another ``--seed`` is refused (the Trainer's batch order follows it, so the rest of
    the resumed epoch would train on other images than the ones it skips as done, and the recipes' eval split
    and sample subsets follow it too); another dataset name is named in a warning (a local copy of the run's
    dataset is fine), and so are other settings that nothing else compares (run length, total batch size, drop
    path rate, ...): the resumed run trains with this run's, which its model card shows."""
    recorded = _recorded_settings(checkpoint, settings) if checkpoint is not None else {}
    if "seed" in recorded and recorded["seed"] != settings["seed"]:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint!r} was trained with --seed {recorded['seed']}, this run has "
            f"--seed {settings['seed']}: the batch order (and the eval split and sample subsets) follow the seed, so "
            "the resumed epoch would retrain some images and skip others; resume with the run's own --seed"
        )
    if "dataset" in recorded and recorded["dataset"] != settings["dataset"]:
        logger.warning("--resume_from_checkpoint %r was trained on %r, this run reads %r: resuming on that data "
                       "(fine for a copy of the same dataset)", checkpoint, recorded["dataset"], settings["dataset"])
    differ = _differences(recorded, settings, skip=_COMPARED_ELSEWHERE)
    if differ:
        logger.warning(
            "--resume_from_checkpoint %r was trained with other settings than this run's: %s (its "
            "run_settings.json); the resumed run trains on with this run's, and its model card shows them",
            checkpoint, "; ".join(differ),
        )
    if checkpoint is None or run_steps is None:
        return
    state = _trainer_state(checkpoint)
    if state is None:
        return
    step = state["global_step"]
    if step >= run_steps:
        epoch = state.get("epoch")
        # fewer training images (or a larger batch, more processes) make the same epochs fewer steps
        per_epoch = (f" (it ran {step} steps in {epoch:g} epochs, {step / epoch:.4g} an epoch; the training set, batch "
                     "size, gradient accumulation and number of processes set an epoch's steps)"
                     if isinstance(epoch, (int, float)) and epoch > 0 else "")
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint!r} has already trained {step} of this run's {run_steps} steps"
            f"{per_epoch}: nothing is left to train; raise --num_train_epochs or --max_steps to train on. (A run stopped after its "
            "last checkpoint, e.g. during the final evaluation or export: that checkpoint is the trained model; "
            "add --export_only to evaluate and export it)"
        )


def check_checkpoint_finished(checkpoint: Optional[str], run_steps: Optional[int],
                              settings: Optional[Dict[str, Any]] = None) -> None:
    """``--export_only``: ``checkpoint`` must be a finished run's, i.e. have trained all of this run's
    ``run_steps`` optimizer steps; the card describes this run's arguments, so a checkpoint cut short (or of a
    shorter run) is refused. With ``settings`` (this run's :func:`card_settings`), a checkpoint whose
    ``run_settings.json`` (:class:`RunSettingsCallback`) records other ones is refused, naming each."""
    if checkpoint is None:
        raise ValueError(_EXPORT_ONLY_NEEDS_A_CHECKPOINT)
    state = _trainer_state(checkpoint)
    if state is None:
        raise ValueError(f"--export_only: {checkpoint!r} has no readable trainer_state.json, so nothing says it "
                         "finished its run; export it with ela_hf.export_pruned instead")
    if settings is not None:
        _check_run_settings(checkpoint, settings)
    if run_steps is not None and state["global_step"] < run_steps:
        raise ValueError(
            f"--export_only: --resume_from_checkpoint {checkpoint!r} has trained {state['global_step']} of this "
            f"run's {run_steps} steps; drop --export_only to train on from it, or give the run's own "
            "--num_train_epochs / --max_steps (the model card describes them)"
        )


def _recorded_settings(checkpoint: str, settings: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The card settings the checkpoint records (:class:`RunSettingsCallback`) that ``settings`` has too (a key
    of another version is not known to both), as JSON values; ``{}`` without ``settings`` or a readable file."""
    from .reporting import RUN_SETTINGS_FILE

    if settings is None:
        return {}
    recorded = _read_json(os.path.join(checkpoint, RUN_SETTINGS_FILE))
    if not isinstance(recorded, dict):
        return {}
    return {k: v for k, v in recorded.items() if k in settings}


def _differences(recorded: Dict[str, Any], settings: Dict[str, Any], skip=frozenset()) -> List[str]:
    """``"key X there, Y here"`` for each recorded setting (``_recorded_settings``) that ``settings`` differs in,
    compared as the file holds them (tuples as lists); keys in ``skip`` left out."""
    if not recorded:
        return []
    from ela_hf.pruning.callback import _as_json

    ours = _as_json(settings)
    return [f"{k} {recorded[k]!r} there, {ours[k]!r} here" for k in recorded if k not in skip and ours[k] != recorded[k]]


def _check_run_settings(checkpoint: str, settings: Dict[str, Any]) -> None:
    from .reporting import RUN_SETTINGS_FILE

    recorded = _recorded_settings(checkpoint, settings)
    if not recorded:
        logger.warning("--export_only: %r has no readable %s (a checkpoint of an older ela_hf?): the model card "
                       "shows this command's settings, which nothing can compare with the run's", checkpoint,
                       RUN_SETTINGS_FILE)
        return
    differ = _differences(recorded, settings)
    if differ:
        raise ValueError(
            f"--export_only: {checkpoint!r} was trained with other settings than this command's, which its model "
            "card would show: " + "; ".join(differ)
            + " (its run_settings.json); give the run's own command (the same launcher and number of processes "
            "too), plus --resume_from_checkpoint ... --export_only"
        )


def check_checkpoint_classes(checkpoint: Optional[str], labels: Sequence[str]) -> None:
    """A resumed checkpoint must have been trained on this run's classes, in this order (``labels``, class id
    order): its classifier's rows are loaded by index, so a renamed, added or removed class folder would
    otherwise give every row another class's name silently (or fail deep inside ``load_state_dict``). Nothing
    is checked without a checkpoint or a readable ``config.json`` in it."""
    if checkpoint is None:
        return
    recorded = _read_json(os.path.join(checkpoint, "config.json"))
    theirs = recorded.get("id2label") if isinstance(recorded, dict) else None
    if isinstance(theirs, dict):
        _check_same_classes(f"--resume_from_checkpoint {checkpoint!r}", theirs, dict(enumerate(labels)),
                            "; a run on these classes starts afresh, in another --output_dir")


def _check_same_classes(what: str, theirs: Mapping, ours: Mapping, advice: str = "") -> None:
    theirs = {int(k): v for k, v in theirs.items()}
    ours = {int(k): v for k, v in ours.items()}
    if theirs != ours:
        differ = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        raise ValueError(
            f"{what} was trained on other classes than --dataset has ({len(theirs)} vs "
            f"{len(ours)}; class {differ[0]}: {theirs.get(differ[0])!r} there, {ours.get(differ[0])!r} here); "
            f"give the run's own --dataset{advice}"
        )


def load_finished_run(checkpoint: str, config) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """``--export_only``: ``(model, pruning_history)`` of a finished run's ``checkpoint``: its weights and skip
    mask, and the pruning decisions its ``ElaPruningCallback`` stored in ``trainer_state.json`` (None for a run
    without pruning). ``config`` is the one this run would train: a checkpoint of other classes is refused."""
    from ela_hf.hf import ElaForImageClassification
    from ela_hf.pruning import ElaPruningCallback

    model = ElaForImageClassification.from_pretrained(checkpoint)
    _check_same_classes(f"--export_only: {checkpoint!r}", model.config.id2label, config.id2label)
    try:
        history = ElaPruningCallback._saved_history(_trainer_state(checkpoint).get("stateful_callbacks"))
    except (KeyError, TypeError):
        raise ValueError(f"--export_only: the pruning state in {checkpoint!r}'s trainer_state.json is damaged "
                         "(no args or history)") from None
    return model, history


def _resolve_checkpoint(training_args) -> Optional[str]:
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None:
        return None
    if checkpoint.lower() in ("last", "latest", "true"):
        output_dir = training_args.output_dir
        found = []
        for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
            match = re.fullmatch(r"checkpoint-(\d+)", name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                found.append((int(match.group(1)), os.path.join(output_dir, name)))
        if not found:
            raise ValueError(f"--resume_from_checkpoint {checkpoint}: no checkpoint-* folder in {output_dir}")
        # newest first; a save cut short (no readable trainer_state.json, written last by the Trainer) is passed over
        incomplete = []
        for _, path in sorted(found, reverse=True):
            if _trainer_state(path) is not None:
                if incomplete:
                    logger.warning(
                        "--resume_from_checkpoint %s: %s %s no readable trainer_state.json (a save cut short?); "
                        "resuming from %s", checkpoint, ", ".join(incomplete),
                        "has" if len(incomplete) == 1 else "have", path,
                    )
                return path
            incomplete.append(path)
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: no complete checkpoint in {output_dir} "
            f"({', '.join(incomplete)} {'has' if len(incomplete) == 1 else 'have'} no readable trainer_state.json)"
        )
    if not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
        raise ValueError(f"--resume_from_checkpoint {checkpoint!r} is not a Trainer checkpoint folder "
                         "(it has no trainer_state.json)")
    if _trainer_state(checkpoint) is None:
        raise ValueError(f"--resume_from_checkpoint {checkpoint!r}: its trainer_state.json is not a readable Trainer "
                         "state (empty or cut short?); resume from an earlier checkpoint")
    return checkpoint


def _read_json(path: str) -> Any:
    """The file's JSON value, or None where it is missing or not JSON (e.g. a write cut short)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _trainer_state(checkpoint: str) -> Optional[dict]:
    """The checkpoint's trainer_state.json, or None where it is missing or not a Trainer state (cut short)."""
    state = _read_json(os.path.join(checkpoint, "trainer_state.json"))
    return state if isinstance(state, dict) and isinstance(state.get("global_step"), int) else None


def keep_resumed_windows(schedule: TrainingSchedule, args: RecipeArguments,
                         checkpoint: Optional[str]) -> TrainingSchedule:
    """A resumed run without ``--kl_windows`` keeps the windows its checkpoint was trained with. The default ones
    are rescaled to the run's length, so a resume with more epochs (training on past a finished run) would get
    other windows, which the pruning callback refuses: decisions already taken cannot move.

    A run without windows (``--kl_windows none``, or an ``mrla_*`` baseline's default) cannot resume a checkpoint
    that was pruning: without the pruning callback its decisions would be dropped from the history and the model
    card while its skipped layers stay skipped. That is refused, naming the arguments that resume it."""
    if checkpoint is None:
        return schedule
    from ela_hf.pruning import ElaPruningCallback

    try:
        saved = ElaPruningCallback._saved_history((_trainer_state(checkpoint) or {}).get("stateful_callbacks"))
        if saved is None:
            return schedule
        unit = saved.get("window_unit")
        windows = [(int(a), int(b)) for a, b in saved.get("windows")]
    except (KeyError, TypeError, ValueError):
        return schedule  # (a damaged state: the callback names it)
    if windows and not schedule.kl_windows:
        given = "--kl_windows none" if args.kl_windows is not None else f"--model {args.model} (no KL windows by default)"
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint!r} was trained with KL windows {_fmt(windows)} ({unit}s), but "
            f"{given} resumes it without pruning: its pruning decisions would be left out of the history and the "
            f"model card while its skipped layers stay skipped. Resume with --kl_windows {_fmt(windows).replace(' ', '')}"
            f" --window_unit {unit} (windows that are over decide nothing more)"
        )
    if args.kl_windows is not None or unit != schedule.window_unit:
        return schedule  # explicit windows, or another unit: the callback refuses moved windows, naming them
    if not windows or windows == [tuple(w) for w in schedule.kl_windows]:
        return schedule
    if schedule.num_epochs is not None and windows[-1][1] > schedule.num_epochs:
        return schedule  # a shorter run than the checkpoint's windows: refused as such later
    logger.warning(
        "resuming %s: keeping the KL windows it was trained with, %s (the defaults for this run's %s epochs would be "
        "%s, and decisions already taken cannot move); pass --kl_windows to choose", checkpoint, _fmt(windows),
        schedule.num_epochs, _fmt(schedule.kl_windows),
    )
    return replace(schedule, kl_windows=windows)


def ddp_for_pruning(training_args, schedule: TrainingSchedule, checkpoint: Optional[str] = None) -> None:
    """Skipped layers get no gradients, so DDP must search for unused parameters: turn the search on for a run
    that prunes, or resumes a ``checkpoint`` with skipped layers (its ``config.json``), when
    ``ddp_find_unused_parameters`` was left unset (the Trainer would turn it off with activation checkpointing).
    Other runs keep the Trainer's choice (no search overhead). A resume of skipped layers with the search turned
    off under several processes is refused (DDP would stop at the first step)."""
    skipped = checkpoint is not None and _checkpoint_skips_layers(checkpoint)
    if not (schedule.kl_windows or skipped):
        return
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = True
    elif training_args.ddp_find_unused_parameters is False and skipped and training_args.world_size > 1:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint!r} has skipped attention layers, whose parameters get no "
            "gradients: DDP needs --ddp_find_unused_parameters True (or leave it unset)"
        )


def _checkpoint_skips_layers(checkpoint: str) -> bool:
    config = _read_json(os.path.join(checkpoint, "config.json"))
    if config is None:
        return False
    masks = [config.get("skip_mask"), (config.get("model_args") or {}).get("skip_mask")]
    return any(isinstance(m, list) and any(any(stage) for stage in m if isinstance(stage, list)) for m in masks)
