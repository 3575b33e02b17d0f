import timm
import torch

import ela_hf  # noqa: F401


def test_cifar_model_runs_forward_and_backward():
    model = timm.create_model("ela_resnet20_cifar", num_classes=10)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 10)
    assert model.layer1[1].attn.wv.weight.grad is not None
