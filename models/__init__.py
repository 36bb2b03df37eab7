"""Model builders. Each ``conf/model/<name>.yaml`` points its ``_target_`` at one of them:

    build_<x>(input_shape: tuple[int, ...], num_outputs: int, **options) -> torch.nn.Module

``input_shape`` (no batch dimension) and ``num_outputs`` come from the dataset; the model maps a
(B, *input_shape) tensor to (B, num_outputs) logits / predictions (no softmax: the loss applies it).

Modules (sources in REFERENCES.md): simple_cnn ([Seed000-Thesis]), mlp (seeds 001-004), basic_cnn
([Seed003-Henriques2019]), resnet ([He2016]), vgg (VGG-f, [Chatfield2014]), timm_model ([Wightman2019]), problems
(Rosenbrock and the Rahimi-Recht linear network, [Seed003-Henriques2019]), common (shared checks).
Heavy dependencies (torchvision, timm) are imported only by the modules that need them.
"""

from models.common import count_parameters

__all__ = ["count_parameters"]
