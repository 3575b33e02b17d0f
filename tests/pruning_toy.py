"""A tiny image-classification setup for the pruning tests: random images, ela_resnet20_cifar, Trainer args.

Shared by tests/test_callback.py and the 2-process script tests/pruning_ddp_run.py.
"""
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import TrainingArguments

import ela_hf  # noqa: F401  (registers the models)

NUM_CLASSES = 4
IMAGE_SIZE = 16


class RandomImages(torch.utils.data.Dataset):
    """Fixed random 16x16 images with a few classes; each item carries its index so tests can see who got what."""

    def __init__(self, n: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        self.labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i], "sample_index": torch.tensor(i)}


class TinyElaClassifier(nn.Module):
    """The smallest wrapper a user would write around a timm ELA model for ``transformers.Trainer``."""

    def __init__(self, model_name: str = "ela_resnet20_cifar", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = timm.create_model(model_name, num_classes=NUM_CLASSES)
        self.seen_indices = []  # training samples this process saw, in order

    def forward(self, pixel_values, labels=None, sample_index=None):
        if self.training and sample_index is not None:
            self.seen_indices.extend(int(i) for i in sample_index)
        logits = self.backbone(pixel_values)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def training_args(output_dir, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=0.05,
        max_steps=6,
        logging_steps=100,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)
