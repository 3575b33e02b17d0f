"""Shared pieces of the training recipes (``recipes/imagenet.py``, ``recipes/cifar.py``).

Data loading and timm transforms, the reference code's SGD + step schedule, top-1/top-5 metrics,
argument checks, and the end-of-run summary. The recipes themselves stay straight-line scripts around
``transformers.Trainer``.
"""
from .arguments import (
    PaperSchedule,
    RecipeArguments,
    TrainingSchedule,
    check_image_size,
    check_model_name,
    min_image_size,
    parse_epochs,
    parse_windows,
    rescale_windows,
    resolve_checkpoint,
    resolve_schedule,
    validate_recipe_arguments,
)
from .data import (
    DIGITS_DATASET,
    ImageClassificationTransform,
    build_transforms,
    check_labels,
    class_names,
    collate_image_batch,
    hub_dataset_id,
    load_digits_dataset,
    load_image_dataset,
    resolve_columns,
    split_train_eval,
)
from .metrics import compute_accuracy, top_k_predictions
from .optim import StepScheduleWithWarmup, create_sgd, create_step_scheduler, scale_learning_rate, update_steps_per_epoch
from .reporting import (
    EpochRecord,
    EpochTimerCallback,
    card_settings,
    format_skip_mask,
    format_summary,
    log_rank_result,
    setup_logging,
)

__all__ = [
    "PaperSchedule",
    "RecipeArguments",
    "TrainingSchedule",
    "check_image_size",
    "check_model_name",
    "min_image_size",
    "parse_epochs",
    "parse_windows",
    "rescale_windows",
    "resolve_checkpoint",
    "resolve_schedule",
    "validate_recipe_arguments",
    "DIGITS_DATASET",
    "ImageClassificationTransform",
    "build_transforms",
    "check_labels",
    "class_names",
    "collate_image_batch",
    "hub_dataset_id",
    "load_digits_dataset",
    "load_image_dataset",
    "resolve_columns",
    "split_train_eval",
    "compute_accuracy",
    "top_k_predictions",
    "StepScheduleWithWarmup",
    "create_sgd",
    "create_step_scheduler",
    "scale_learning_rate",
    "update_steps_per_epoch",
    "EpochRecord",
    "EpochTimerCallback",
    "card_settings",
    "format_skip_mask",
    "format_summary",
    "log_rank_result",
    "setup_logging",
]
