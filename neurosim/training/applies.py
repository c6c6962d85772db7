"""Where a run's settings apply, and which of their values the run can compute with or mean.

A configuration field declares in its metadata where it ``Applies`` (the kinds of data, of
model, the processes that read it) and a ``check`` of its value against the rest of the
configuration (the functions at the end); ``neurosim.training.config.check_given`` runs them over the
settings a user gave. ``representable_problem`` says which numbers the run's float32 and int64
arithmetic can hold. Nothing here loads PyTorch.
"""

from __future__ import annotations

import math
import os

import attrs

from neurosim.common.errors import UserError
from neurosim.data import DATASETS, folder_root
from neurosim.models.registry import MODELS


def option(key: str) -> str:
    """The command-line option of a field: ``batch_size`` → ``--batch-size``."""
    return "--" + key.replace("_", "-")


def shown(value) -> str:
    """A value as the command line writes it: ``60,120,160``, ``0.05``."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


# The run computes in float32, and a real setting multiplies values of its own size (a learning
# rate the gradients of the weights it changes, a noise sigma the noise it scales, squared in the
# mirror update), so its square must be a float32 too: 0, or a size from 2**-63 (about 1.1e-19; below
# it the square is 0) to 2**63 (about 9.2e18; above it the square overflows).
REAL_RANGE = (2.0**-63, 2.0**63)
# Whole-number settings are counted in 64-bit integers (tensor sizes, step counters).
WHOLE_MAX = 2**63 - 1


def representable_problem(key: str, value) -> str | None:
    """Why the setting ``key`` cannot hold ``value`` where the run uses it, or None: a real number
    that is not finite or outside ``REAL_RANGE``, a whole number (or one of a list) above
    ``WHOLE_MAX``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return f"{key} must be a finite number, got {value}"
        lo, hi = REAL_RANGE
        if value != 0 and not lo <= abs(value) <= hi:
            return (f"{option(key)} {value:g} cannot be computed with: the run computes in float32, where a "
                    f"setting times a value of its own size must still be a number, so a real setting is 0 or "
                    f"between {lo:.2g} and {hi:.2g} in size")
    values = value if isinstance(value, tuple) else (value,)
    if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > WHOLE_MAX for v in values):
        return (f"{option(key)} {','.join(map(str, values))} is larger than the run can count: whole-number "
                f"settings are 64-bit integers, at most {WHOLE_MAX}")
    return None


def data_kind(data: str) -> str:
    """The family of the dataset ``data`` names, as its declaration says (``digits``, ``cifar``,
    ``synthetic``, …; ``neurosim.data.register_dataset``), or ``folder`` for a folder of images
    (a path, or a named folder such as ``imagenet``)."""
    dataset = DATASETS.get(data)
    return "folder" if dataset is None or dataset.is_folder else dataset.family


def reads_data_dir(data: str) -> bool:
    """Whether the dataset ``data`` names is read from ``--data-dir``: a folder (its decoded
    cache is kept there; a named folder is found there) or a dataset declared so (CIFAR)."""
    dataset = DATASETS.get(data)
    return dataset is None or dataset.is_folder or dataset.reads_data_dir


def known_images(cfg) -> tuple[tuple[int, int, int], int] | None:
    """The image shape and the number of training images of ``cfg``'s data where they are known
    before it is loaded (declared with the dataset; synthetic's are settings), else None."""
    dataset = DATASETS.get(cfg.data)
    if dataset is None or dataset.is_folder or dataset.image_shape is None:
        return None
    train = cfg.synthetic_train if cfg.data == "synthetic" else dataset.train_images
    return None if train is None else (dataset.image_shape, train)


def processes() -> int:
    """The processes that train together: torchrun's ``WORLD_SIZE``, or 1 without torchrun."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _kinds(kinds) -> str:
    """Data kinds for a message: ``--data cifar10 or cifar100``, ``image folders``."""
    out = []
    for kind in kinds:
        names = [name for name, d in DATASETS.items() if not d.is_folder and d.family == kind]
        out.append("image folders" if kind == "folder" else f"--data {' or '.join(names) or kind}")
    return " and ".join(out)


@attrs.frozen
class Applies:
    """Where a setting is read; given anywhere else it would change nothing, and is refused.

    ``data``: the kinds of dataset (``data_kind``) that read it; ``data_dir``: only data read
    from ``--data-dir`` (``reads_data_dir``); ``held``: True where the data is held in memory
    only, False where a folder is read from disk as the run trains only; ``model``: ``"mlp"``,
    models of the mlp family only, or ``"resnet"``, models of the others (their families are
    declared in ``neurosim.models.registry``); ``several``: under torchrun with several processes
    only; ``needs``: a field that must be set (not 0, not empty) for this one to be read. None or False: no
    condition. ``why`` says what the setting does where it applies; ``instead``, for a setting
    of one kind of model, what the other kind does instead (formatted with the configuration's
    fields)."""

    data: tuple[str, ...] | None = None
    data_dir: bool = False
    held: bool | None = None
    model: str | None = None
    several: bool = False
    needs: str | None = None
    why: str = ""
    instead: str = ""

    def problem(self, cfg, key: str, name: str, streamed: bool | None = None) -> str | None:
        """Why ``cfg``'s run (called ``name`` in the message) does not read the setting ``key``, or
        None if it does. ``streamed``: whether its folder is read from disk, once known (None: as
        far as ``cfg`` says)."""
        opt, kind, why = option(key), data_kind(cfg.data), self.why
        mlp = MODELS[cfg.model].is_mlp if cfg.model in MODELS else cfg.model == "mlp"
        if self.model == "mlp" and not mlp:
            return (f"{opt} applies to MLPs only and {name} is a {cfg.model} ({self.instead}); for an MLP use a preset "
                    f"such as {cfg.rule}_mlp_digits")
        if self.model == "resnet" and mlp:
            instead = self.instead.format(**{k: shown(v) for k, v in attrs.asdict(cfg).items()})
            return f"{opt} applies to ResNets only; {name} is an MLP: {instead}"
        if self.data is not None and kind not in self.data:
            return f"{opt} applies to {_kinds(self.data)} only ({why}); this run's data is {cfg.data}: leave {opt} out"
        if self.data_dir and not reads_data_dir(cfg.data):
            readers = [n for n, d in DATASETS.items() if d.reads_data_dir and not d.is_folder]
            return (f"{opt} applies to data kept in a directory only (--data {' or '.join(readers)}, and image "
                    f"folders: {why}); this run's data is {cfg.data}, which needs none: leave {opt} out")
        if self.held is not None and kind == "folder":
            if streamed is None and cfg.stream != "auto":
                streamed = cfg.stream == "on"
            if streamed is True and self.held:
                return (f"{opt} applies to data held in memory only ({why}); {cfg.data} is read from disk as the run "
                        f"trains (--stream {cfg.stream}), and its loader crops each image (random-resized to "
                        f"--image-size), flips it and shuffles the images itself: leave {opt} out")
            if streamed is False and not self.held:
                how = "" if cfg.stream == "off" else ", since its images are of one size and fit in memory"
                return (f"{opt} applies to folders read from disk as the run trains only ({why}); {cfg.data} is "
                        f"decoded once and held in memory (--stream {cfg.stream}{how}): leave {opt} out, or read it "
                        f"from disk with --stream on")
        if self.several and processes() < 2:
            return (f"{opt} applies under torchrun with several processes only ({why}); this run is one process "
                    f"(WORLD_SIZE is {os.environ.get('WORLD_SIZE', 'unset')}): leave {opt} out")
        if self.needs is not None and not getattr(cfg, self.needs):
            value = getattr(cfg, self.needs)
            return (f"{opt} applies only with {option(self.needs)} ({why}), and this run has "
                    f"{option(self.needs)} {shown(value) if value != () else 'none'}: give {option(self.needs)} "
                    f"too, or leave {opt} out")
        return None


# -- values that cannot be meant (a field's ``check``: why its value cannot be meant, or None) -----

def milestones_within_epochs(cfg) -> str | None:
    """A milestone at or after the last epoch: the learning rate would never change there."""
    late = [m for m in cfg.milestones if m >= cfg.epochs]
    if late:
        return (f"--milestones {shown(cfg.milestones)}: the learning rate changes after a milestone epoch and this run "
                f"ends after epoch {cfg.epochs} (--epochs), so milestone {late[0]} would never take effect; give "
                f"milestones below {cfg.epochs}, or more --epochs")
    return None


def in_time_only(cfg) -> str | None:
    """A setting of the circuit in time on a run with instant dynamics: it would change nothing."""
    if cfg.dynamics != "time":
        return ("the time constants, delay and stimulus duration (--dt, --duration, --tau, --tau-plasticity, "
                "--tau-decay, --tau-eligibility, --delay, --settle, --time-update, --noise, --tau-noise, --plasticity) apply to a circuit run in time "
                "only, and this run has --dynamics instant: add --dynamics time, or leave them out")
    return None


def padding_within_image(cfg) -> str | None:
    """Padding as wide as the images (where their size is known): a crop could miss them."""
    known = known_images(cfg)
    if known is None:
        return None
    (_, h, w), _ = known
    if cfg.crop_padding >= min(h, w):
        return (f"--crop-padding {cfg.crop_padding} pads the {h}×{w} images of {cfg.data} by {cfg.crop_padding} "
                f"pixels on each side, so a random crop could hold none of the image; give less than {min(h, w)} "
                f"(CIFAR's recipe pads its 32×32 images by 4)")
    return None


def width_has_channels(cfg) -> str | None:
    """A width that rounds a ResNet's narrowest stage (64 channels at width 1) to none."""
    if round(64 * cfg.width) < 1:
        return (f"--width {cfg.width:g} gives a ResNet's first stage round(64 × {cfg.width:g}) = 0 channels; a width "
                f"above 1/128 (0.0079) gives it at least one")
    return None


def folder_holds_out(cfg) -> str | None:
    """``--val-per-class`` on a folder that has a test split of its own, or holding none out."""
    if data_kind(cfg.data) != "folder":
        return None
    try:
        root = folder_root(cfg.data, cfg.data_dir)
    except UserError:
        return None  # the run names a folder that is not there when it loads it
    if (root / "train").is_dir() and (root / "val").is_dir():
        return (f"--val-per-class applies to a folder of class folders only; {cfg.data} holds train/ and val/, and "
                f"val/ is its test split: leave --val-per-class out")
    if cfg.val_per_class == 0:
        return ("--val-per-class 0 holds no image of the folder out, and the run is scored on held-out images after "
                "every epoch: a folder needs at least one test image per class (none: 10 % of each class)")
    return None


def within_training_images(cfg) -> str | None:
    """``--train-limit`` above the training images the data has (where that is known)."""
    known = known_images(cfg)
    if known is not None and cfg.train_limit > known[1]:
        return (f"--train-limit {cfg.train_limit} is more than the {known[1]} training images of {cfg.data}; "
                f"0 trains on all of them")
    return None
