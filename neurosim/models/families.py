"""The built-in models, declared with `register_model`: the MLP and the CIFAR and ImageNet
ResNets, with the preset recipes they bring. Their builders import PyTorch when called; this
module does not."""

from neurosim.models.registry import Recipe, register_model

DEPTHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
IMAGENET_SUFFIX = "_imagenet"
IMAGENET_RESNETS = tuple(f"{depth}{IMAGENET_SUFFIX}" for depth in DEPTHS)

_DIGITS = dict(data="digits", hidden=(128, 64), activation="relu", epochs=30, batch_size=32, lr=0.05,
               momentum=0.9, monitor_every=20)

# The weight-mirror authors' NumPy experiments (MLP, MNIST/CIFAR-10): sigmoid units, sigmoid
# cross-entropy, plain SGD on batch 128 without shuffling, N(0, 1/(n_in+n_out)) init, 400 epochs.
# Hidden width 1000 is their CIFAR-10 network; use --hidden 500 for their MNIST one.
_ORIGINAL = dict(data="cifar10", hidden=(1000,), activation="sigmoid", init="xavier_sum", loss="sigmoid_bce",
                 normalize="unit", shuffle=False, epochs=400, batch_size=128, momentum=0.0)

# Standard CIFAR-100 ResNet recipe: SGD momentum 0.9, lr 0.1 at batch 128, weight decay 5e-4,
# 200 epochs, lr ×0.2 at epochs 60/120/160, random crop (pad 4) + horizontal flip.
_RESNET = dict(data="cifar100", init="kaiming_normal", epochs=200, batch_size=128, lr=0.1, momentum=0.9,
               weight_decay=5e-4, milestones=(60, 120, 160), lr_gamma=0.2, crop_padding=4, flip=True)

# The ImageNet recipe of the weight-mirror paper's era (Goyal et al. 2017): 90 epochs of SGD with
# momentum 0.9 and weight decay 1e-4, lr 0.1 per 256 images scaled linearly to the global batch
# (lr_batch), ×0.1 at epochs 30/60/80. ImageNet's folder streams (stream "auto" streams its train/ +
# val/ layout; a small dataset such as synthetic, for a smoke run, stays on the device); the loader crops
# (random-resized, image_size) and flips each image itself: no crop_padding or flip here.
_IMAGENET = dict(data="imagenet", image_size=224, init="kaiming_normal", epochs=90, batch_size=256,
                 lr=0.1, lr_batch=256, momentum=0.9, weight_decay=1e-4, milestones=(30, 60, 80), lr_gamma=0.1,
                 monitor_every=500)


@register_model("mlp", family="mlp", about="multilayer perceptron: dense plastic synapses, hidden populations of "
                                           "--hidden sizes",
                recipes={"mlp_digits": Recipe("8×8 digits MLP (64-128-64-10, ReLU)", _DIGITS),
                         "mlp_original": Recipe("the weight-mirror authors' NumPy MLP experiments", _ORIGINAL)})
def mlp(cfg, rule, image_shape, num_classes):
    """`build_mlp` with the configuration's hidden sizes, activation, initialisation, biases and seed."""
    from neurosim.models.mlp import build_mlp

    return build_mlp(rule, image_shape, cfg.hidden, num_classes, cfg.activation, cfg.init, cfg.seed,
                     bias=cfg.bias)


def resnet(cfg, rule, image_shape, num_classes):
    """`build_resnet` of the configuration's model, width and seed."""
    from neurosim.models.resnet import build_resnet

    return build_resnet(cfg.model, rule, num_classes, image_shape, cfg.width, cfg.seed)


for _depth in DEPTHS:
    _block, _blocks = DEPTHS[_depth]
    register_model(_depth, family="resnet", about=f"CIFAR {_depth} ({_block} blocks "
                   f"{'-'.join(map(str, _blocks))}): 3×3 stem, no max-pool; channels × --width",
                   recipes={_depth: Recipe(f"CIFAR {_depth}, standard CIFAR-100 recipe", _RESNET)})(resnet)
for _depth in DEPTHS:
    register_model(f"{_depth}{IMAGENET_SUFFIX}", family="imagenet resnet",
                   about=f"ImageNet {_depth}, torchvision's layout (7×7 stride-2 stem, max-pool); channels × --width",
                   recipes={f"{_depth}{IMAGENET_SUFFIX}": Recipe(
                       f"ImageNet {_depth} (torchvision's layout), 90-epoch ImageNet recipe", _IMAGENET)})(resnet)
del _depth, _block, _blocks
