#!/usr/bin/env python
"""Train an ImageNet layer-attention ResNet with ELA's staged KL/EBQM pruning (the paper's ImageNet-1K recipe).

    accelerate launch --multi_gpu --num_processes 8 recipes/imagenet.py --output_dir outputs/ela_resnet50 --bf16
    python recipes/imagenet.py --dataset path/to/images --model ela_resnet18 --num_train_epochs 10 --use_cpu

Paper defaults (the reference code's recipe): ela_resnet50 on ILSVRC/imagenet-1k, SGD momentum 0.9,
lr 0.1 per 256 images of total batch (scaled linearly), 32 images per device, weight decay 1e-4,
100 epochs, lr x0.1 after epochs 30, 60 and 90, 3 linear warm-up epochs, RandomResizedCrop 224 +
horizontal flip, evaluation resize 256 + center crop 224, drop path 0.2 on the attention branch, KL
windows 1-3 and 51-53 with EBQM Beta(2, 5), tau 0.25. With fewer epochs the epoch-based schedule is
rescaled to fit. Every ``TrainingArguments`` option works too (``--bf16``, ``--torch_compile``, ...).

Writes to ``--output_dir``: Trainer checkpoints (full structure: ``--resume_from_checkpoint`` continues
them), the final full model, ``pruning_history.json``, ``eval_results.json``, and the slim Hub-ready
release with its model card in ``<output_dir>/export`` (pushed with ``--push_to_hub --hub_model_id ...``).
The run's command plus ``--resume_from_checkpoint last --export_only`` evaluates and exports (pushes) a
finished run again without training, e.g. after a run stopped during its export; every checkpoint's
``run_settings.json`` keeps the settings the card shows, and a command that differs from them is refused.
"""
import logging
import os

import timm
import transformers
from transformers import HfArgumentParser, Trainer, TrainingArguments

from ela_hf import ElaConfig, ElaForImageClassification, ElaPruningCallback, export_pruned, push_pruned_to_hub
from ela_hf.models import MODEL_ARGS, get_skip_mask
from ela_hf.training import (
    EpochTimerCallback,
    ImageClassificationTransform,
    avoid_single_image_batch,
    PaperSchedule,
    RecipeArguments,
    RunSettingsCallback,
    build_selector,
    build_transforms,
    card_settings,
    check_checkpoint_classes,
    check_metric_for_best_model,
    check_split_images,
    check_checkpoint_finished,
    check_checkpoint_unfinished,
    check_export_dir,
    check_training_arguments,
    close_distributed,
    ddp_for_pruning,
    keep_resumed_windows,
    collate_image_batch,
    compute_accuracy,
    create_sgd,
    create_step_scheduler,
    format_summary,
    hub_dataset_id,
    load_finished_run,
    load_image_dataset,
    log_rank_result,
    prepare_splits,
    pruned_by_default,
    recipe_pretrained_cfg,
    recipe_help,
    release_name,
    remove_stale_pruning_history,
    resolve_checkpoint,
    resolve_schedule,
    scale_learning_rate,
    setup_logging,
    split_train_eval,
    top_k_predictions,
    update_steps_per_epoch,
    validate_recipe_arguments,
)

logger = logging.getLogger(__name__)

PRUNING_PRESET = ElaPruningCallback.imagenet()
PAPER_SCHEDULE = PaperSchedule(
    epochs=100, lr_decay_epochs=(30, 60, 90), warmup_epochs=3, kl_windows=tuple(PRUNING_PRESET.windows)
)
PAPER_DEFAULTS = dict(
    model="ela_resnet50",
    dataset="ILSVRC/imagenet-1k",
    learning_rate=0.1,
    lr_batch_size=256,  # --learning_rate is per 256 images, scaled to the total batch size
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    weight_decay=1e-4,
    num_train_epochs=PAPER_SCHEDULE.epochs,
    output_dir="outputs/imagenet",
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=2,
    logging_steps=100,
    dataloader_num_workers=8,
    # the dataset yields image/label columns that set_transform turns into pixel_values/labels
    remove_unused_columns=False,
)


def main(argv=None):
    # ---------------------------------------------------------------------------------------------
    # 1. arguments: ours + TrainingArguments, with the paper's defaults; bad ones fail here
    parser = HfArgumentParser((RecipeArguments, TrainingArguments))
    parser.set_defaults(**PAPER_DEFAULTS)
    recipe_help(parser)
    args, training_args = parser.parse_args_into_dataclasses(argv)
    setup_logging(logger, training_args)
    validate_recipe_arguments(args)
    check_training_arguments(args, training_args, timm.models.get_pretrained_cfg(args.model).input_size[-1], argv)
    has_attention = MODEL_ARGS[args.model]["attn_type"] is not None
    prune = pruned_by_default(args.model)  # ela_* yes; mrla_* baselines only with --kl_windows
    resolve_schedule(PAPER_SCHEDULE, args, training_args.num_train_epochs, training_args.max_steps,
                     has_attention=has_attention, pruned_by_default=prune)
    checkpoint = resolve_checkpoint(training_args, args.model)
    check_export_dir(args.export_dir, training_args.output_dir)
    selector = build_selector(args, PRUNING_PRESET.selector) if has_attention else None
    # the release is the slim export pushed at the end, not the Trainer's full training checkpoints
    push_repo = (training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
                 if training_args.push_to_hub else None)
    training_args.push_to_hub = False

    # ---------------------------------------------------------------------------------------------
    # 2. data: timm's data config of the model, ImageNet augmentation
    pretrained_cfg = recipe_pretrained_cfg(args.model, "imagenet", args.image_size)  # also the export's
    data_config = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg)
    # the main process fills the datasets cache first; the others then read it
    with training_args.main_process_first(desc="loading the dataset"):
        data = load_image_dataset(args.dataset, args.dataset_config, image_size=data_config["input_size"][-1])
        train_ds, eval_ds, eval_name = split_train_eval(
            data, args.train_split, args.eval_split, args.eval_fraction, seed=training_args.seed
        )
    train_ds, eval_ds, image_column, label_column, labels = prepare_splits(
        train_ds, eval_ds, eval_name, image_column=args.image_column, label_column=args.label_column,
        class_source=data[args.train_split], max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples, seed=training_args.seed, decode_images=False,
    )
    train_ds = avoid_single_image_batch(train_ds, args.model, data_config["input_size"][-1],
                                        training_args.per_device_train_batch_size, training_args.world_size,
                                        training_args.dataloader_drop_last)
    train_transform, eval_transform = build_transforms(data_config, "imagenet", hflip=args.hflip)
    train_ds.set_transform(ImageClassificationTransform(train_transform, image_column, label_column))
    eval_ds.set_transform(ImageClassificationTransform(eval_transform, image_column, label_column))
    steps_per_epoch = update_steps_per_epoch(
        len(train_ds), training_args.per_device_train_batch_size, training_args.world_size,
        training_args.gradient_accumulation_steps, training_args.dataloader_drop_last,
    )
    schedule = resolve_schedule(PAPER_SCHEDULE, args, training_args.num_train_epochs, training_args.max_steps,
                                steps_per_epoch, has_attention=has_attention, pruned_by_default=prune)
    schedule = keep_resumed_windows(schedule, args, checkpoint)  # a longer resumed run keeps its windows
    total_batch_size = (training_args.per_device_train_batch_size * training_args.world_size
                        * training_args.gradient_accumulation_steps)
    learning_rate = scale_learning_rate(training_args.learning_rate, args.lr_batch_size, total_batch_size)
    if not schedule.kl_windows:
        selector = None  # nothing is pruned: the card names no selector
    # the model card's settings, kept in every checkpoint: --export_only compares them with its own
    settings = card_settings("imagenet", args, training_args, schedule, learning_rate, total_batch_size, selector)
    check_checkpoint_classes(checkpoint, labels)  # its classifier rows are loaded by index
    check_metric_for_best_model(training_args.metric_for_best_model, len(labels))
    if args.export_only:
        check_checkpoint_finished(checkpoint, schedule.run_steps, settings)
    else:
        check_checkpoint_unfinished(checkpoint, schedule.run_steps, settings)
    ddp_for_pruning(training_args, schedule, checkpoint)  # DDP must search for skipped layers' unused parameters
    logger.info(f"{args.dataset}: {len(train_ds)} training images, {len(eval_ds)} from {eval_name!r}, "
                f"{len(labels)} classes; input {data_config['input_size']}")
    if not args.export_only:  # unreadable images stop the run now, not after a training epoch
        check_split_images(args.check_images, train_ds, eval_ds, image_column, args.train_split, eval_name,
                           progress=not training_args.disable_tqdm)
    logger.info(f"schedule: {schedule.describe()}")

    # ---------------------------------------------------------------------------------------------
    # 3. model: the timm network inside a transformers PreTrainedModel (save_pretrained, Hub, pipelines)
    transformers.set_seed(training_args.seed)
    config = ElaConfig(
        architecture=args.model,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        drop_path_rate=args.drop_path_rate if has_attention else 0.0,  # it acts on the attention branch
        pretrained_cfg=pretrained_cfg,
    )
    if args.export_only:  # the finished run's trained model, and the pruning decisions its checkpoint keeps
        model, finished_history = load_finished_run(checkpoint, config)
    else:
        model = ElaForImageClassification(config)

    # ---------------------------------------------------------------------------------------------
    # 4. optimizer, step schedule, pruning windows
    optimizer = create_sgd(model, learning_rate, args.momentum, training_args.weight_decay)
    scheduler = create_step_scheduler(optimizer, steps_per_epoch, schedule.warmup_epochs,
                                      schedule.lr_decay_epochs, args.lr_decay_rate, schedule.run_steps)
    timer = EpochTimerCallback()
    callbacks = [timer, RunSettingsCallback(settings)]
    pruning = None
    if schedule.kl_windows and not args.export_only:
        pruning = ElaPruningCallback(schedule.kl_windows, selector, schedule.window_unit)
        callbacks.append(pruning)
    if not args.export_only:
        remove_stale_pruning_history(training_args, resuming=checkpoint is not None, pruning=pruning is not None)

    # ---------------------------------------------------------------------------------------------
    # 5. train
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collate_image_batch,
        compute_metrics=compute_accuracy,
        preprocess_logits_for_metrics=top_k_predictions,
        optimizers=(optimizer, scheduler),
        callbacks=callbacks,
    )
    if not args.export_only:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    # ---------------------------------------------------------------------------------------------
    # 6. evaluate, export the slim release with its model card, push, summarise
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    skip_mask = get_skip_mask(model) if has_attention else None
    log_rank_result(logger, training_args, metrics, model)
    export_dir = args.export_dir or os.path.join(training_args.output_dir, "export")
    if trainer.is_world_process_zero():
        history = os.path.join(training_args.output_dir, "pruning_history.json")
        if args.export_only:
            history = finished_history
        elif pruning is None or not os.path.exists(history):
            history = None  # this run's decisions only: a file left by an earlier run is not this model's
        export_kwargs = dict(
            pruning_history=history,
            training_args=settings,
            metrics={k: v for k, v in metrics.items() if k in ("eval_top1", "eval_top5", "eval_loss")},
            dataset=hub_dataset_id(args.dataset),
            id2label=config.id2label,
            model_name=release_name(args.model, args.dataset),
        )
        export_pruned(model, export_dir, overwrite=True, **export_kwargs)
        if push_repo is not None:
            push_pruned_to_hub(model, push_repo, token=training_args.hub_token,
                               private=training_args.hub_private_repo, **export_kwargs)
            logger.info(f"pushed the slim release to {push_repo}")
        print(format_summary(args.model, args.dataset, metrics, len(eval_ds), skip_mask, timer.records,
                             export_dir, steps_per_epoch))
    trainer.accelerator.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    main()
    close_distributed(logger)
