"""What a run will hold in memory, estimated before anything is loaded, allocated or written.

``check_budget(cfg, given)`` refuses a configuration that cannot fit in the memory of the
device it would train on (the host's RAM for the CPU; a CUDA GPU's own memory, and the host's
RAM for what stays there), naming the setting that makes it that large. It counts, in bytes:

- **the circuit's state**: every parameter and buffer (forward weights, biases, norms, feedback
  weights), a gradient for each learned one, a momentum buffer for each engaged one when
  ``--momentum`` is set, and the two host copies a checkpoint keeps (the state and its
  serialised file). The circuit is built on PyTorch's ``meta`` device, which allocates nothing,
  so the sizes are the real circuit's (``--hidden``, ``--width``, the image shape);
- **the largest of**: one training batch's activity and error at every population (2 bytes a
  value under bf16, else 4), one evaluation batch's activity, and one mirror batch of a sleep
  (WM: the noise and the response of the synapse whose mirror batch is largest,
  ``mirror_batch`` of ``--wm-sleep-batch-size`` or ``--batch-size`` and ``--wm-sleep-events``);
- **the images held in memory** (digits, CIFAR, synthetic, a decoded folder: one byte a
  pixel, on the device and on the host, which loads them), with the float32 draws the
  synthetic set is made from or the copy a folder's split makes while it loads;
- for a **streamed folder**, the batches its loader processes prepare ahead (``--workers`` × 2
  batches of ``--image-size`` images, on the host) and the batch being decoded on the device;
- the **monitor's probe batch** (``--monitor-probe`` images as float32, on the device).

It leaves out what cannot be known beforehand (PyTorch's workspaces and allocator cache,
intermediate tensors of the autograd graph beyond one activity and one error per population,
``torch.compile``'s buffers, the monitor's records, which the monitor checks itself), so it errs
low: what it refuses cannot fit; what it passes may still not.

It also refuses what the circuit's shape shows cannot train: batch norm over a single value per
channel (a 1×1 population in a batch of one image), a ``--monitor-synapses`` pattern that
matches no synapse, and ``--image-size`` or ``--workers`` on a folder that ``--stream auto``
decodes into memory instead of streaming.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import attrs

from neurosim.common.errors import UserError
from neurosim.models.registry import MODELS
from neurosim.training import config
from neurosim.training.applies import data_kind, processes

# The settings whose values size each part of the estimate, in the order they are named.
_DRIVERS = {
    "state": ("hidden", "width", "image_size"),
    "activity": ("batch_size", "image_size", "hidden", "width"),
    "sleep": ("{rule}_sleep_batch_size", "{rule}_sleep_events", "batch_size"),
    "images": ("synthetic_train", "synthetic_test", "data"),
    "loader": ("workers", "batch_size", "image_size"),
    "probe": ("monitor_probe", "image_size"),
}
_PREFETCH = 2  # batches each loader process prepares ahead (neurosim.data.folder_stream)


@attrs.frozen
class DataFacts:
    """What the estimate needs of a run's data: one image's shape, the classes, the training
    and test images (None where counting them would mean reading a whole streamed folder), and
    whether the folder is streamed."""

    shape: tuple[int, int, int]
    classes: int
    train: int | None
    test: int | None
    streamed: bool


@attrs.frozen
class Part:
    """One part of the estimate: what it is, its bytes on the device and on the host, and the
    settings that size it (``_DRIVERS``)."""

    what: str
    device: float
    host: float
    drivers: str


def check_budget(cfg, given=()) -> None:
    """Refuse ``cfg`` if its run cannot fit in memory (see the module's docstring), or if its
    circuit cannot train on batches of its size; ``given`` are the settings the user gave, which
    the message names first. Reads folder names and one image header at most; allocates nothing."""
    facts = data_facts(cfg)
    if facts is None:
        return  # a dataset declared without its sizes: nothing to estimate from
    base = config.fields_of(cfg.preset) if cfg.preset in config.PRESETS else {}
    given = [k for k in given if k not in base or _value(cfg, k) != base[k]]
    if data_kind(cfg.data) == "folder":
        config.check_given(cfg, given, streamed=facts.streamed)
    circuit = _meta_circuit(cfg, facts)
    _check_batch_norm(cfg, facts, circuit)
    if circuit is not None and cfg.monitor_every:
        from neurosim.observe.monitors import MonitorConfig

        MonitorConfig(synapses=cfg.monitor_synapses).select(circuit.synapses)  # refuses a pattern matching none
    device = _device(cfg)
    parts = estimate(cfg, facts, circuit, device)
    where = [("device", device)] if device.type == "cuda" else []
    where.append(("host", None))
    for side, dev in where:
        need = sum(getattr(p, side) for p in parts)
        local = _local_processes() if side == "host" else 1
        need *= local
        have, name = _capacity(dev)
        if need > have:
            worst = max(parts, key=lambda p: getattr(p, side))
            raise UserError(_too_large(cfg, given, worst, getattr(worst, side) * local, need, have, name, local))


def data_facts(cfg) -> DataFacts | None:
    """The shape, classes and sizes of ``cfg``'s data, without loading it: as its declaration
    says (``neurosim.data.register_dataset``), or for a folder from its file names (and one
    image's header where it is decoded into memory); None for a dataset declared without them."""
    from neurosim.data import DATASETS, folder_root, folder_splits, wants_stream

    streamed = wants_stream(cfg.data, cfg.data_dir, cfg.stream)  # refuses --stream on for a named dataset
    dataset = DATASETS.get(cfg.data)
    if dataset is not None and not dataset.is_folder:
        synthetic = cfg.data == "synthetic"  # its sizes are settings
        train = cfg.synthetic_train if synthetic else dataset.train_images
        test = cfg.synthetic_test if synthetic else dataset.test_images
        if dataset.image_shape is None or dataset.classes is None or train is None or test is None:
            return None
        return DataFacts(dataset.image_shape, dataset.classes, train, test, streamed=False)
    root = folder_root(cfg.data, cfg.data_dir)
    if streamed:  # listing a streamed folder (ImageNet) takes seconds: its classes are its folders
        tree = root / "train" if (root / "train").is_dir() and (root / "val").is_dir() else root
        classes = sum(1 for p in tree.iterdir() if p.is_dir())
        return DataFacts((3, cfg.image_size, cfg.image_size), max(classes, 2), None, None, streamed=True)
    classes, (train, _), (test, _) = folder_splits(root, cfg.val_per_class)
    return DataFacts(_image_shape(train[0]), len(classes), len(train), len(test), streamed=False)


def _image_shape(path: str) -> tuple[int, int, int]:
    """(channels, height, width) of the image at ``path`` as a folder decodes it (greyscale one
    channel, everything else RGB); a header that cannot be read counts as one pixel (the loader
    names unreadable images itself)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
            return (1 if im.mode in ("L", "I", "I;16", "I;16B", "I;16L") else 3), h, w
    except Exception:  # noqa: BLE001
        return 3, 1, 1


def _meta_circuit(cfg, facts: DataFacts):
    """The run's circuit built on the ``meta`` device (shapes without storage), or None for one
    with a tensor too large to have a size at all (more than 2**63 bytes)."""
    import torch

    from neurosim.training.run import build_circuit

    try:
        with torch.device("meta"):
            return build_circuit(cfg, facts.shape, facts.classes)
    except (RuntimeError, OverflowError) as e:
        if "overflow" in str(e).lower() or "too large" in str(e).lower():
            return None
        raise


def estimate(cfg, facts: DataFacts, circuit, device) -> list[Part]:
    """The parts of a run's memory (``Part``), in bytes on its device and on the host; a circuit
    of None (too large to build even on ``meta``) counts as infinitely large."""
    cuda = device.type == "cuda"
    pixels = math.prod(facts.shape)
    batch = cfg.batch_size
    busiest = Part("one batch's activity and errors", math.inf, 0, "activity")
    if circuit is None:
        state = checkpoint = math.inf
    else:
        tensors = [*circuit.parameters(), *circuit.buffers()]
        held = sum(t.numel() * t.element_size() for t in tensors)
        learned = [*circuit.engaged_parameters(), *circuit.sleep_parameters()]
        grads = sum(t.numel() * t.element_size() for t in learned)
        momentum = sum(t.numel() * t.element_size() for t in circuit.engaged_parameters()) if cfg.momentum else 0
        state = held + grads + momentum
        checkpoint = 2 * (held + momentum)
        per_image = sum(math.prod(p.shape) for p in circuit.populations.values())
        bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)
        value = 2 if bf16 else 4
        evaluation = (batch if facts.streamed else max(batch, 256)) * per_image * value
        busiest = max([Part("one training batch's activity and errors", 2 * batch * per_image * value, 0, "activity"),
                       Part("one evaluation batch's activity", evaluation, 0, "activity"),
                       Part("one mirror batch of a sleep (noise and response)", _sleep_bytes(cfg, circuit), 0,
                            "sleep")], key=lambda p: p.device)
    images = 0 if facts.streamed else (facts.train + facts.test) * pixels
    making = 0
    if cfg.data == "synthetic":
        making = 2 * 4 * max(facts.train, facts.test) * pixels  # randn draws and their sum, float32
    elif data_kind(cfg.data) == "folder" and not facts.streamed:
        making = images  # a decoded folder's split is a copy of its images
    loader = (max(cfg.workers, 1) * _PREFETCH * batch * pixels) if facts.streamed else 0
    probe = 0
    if cfg.monitor_every and cfg.monitor_probe:
        probe = min(cfg.monitor_probe, facts.train or cfg.monitor_probe) * pixels * 4
    on_device = batch * pixels if facts.streamed else 0  # the uint8 batch before it is normalised
    parts = [
        Part("the circuit's weights with their gradients and momentum", state, 0, "state"),
        Part("a checkpoint's two host copies of the state", 0, checkpoint, "state"),
        attrs.evolve(busiest, device=busiest.device + on_device),
        Part("the images held in memory", images, images + making if cuda else making, "images"),
        Part("the loader's batches in flight", 0, loader, "loader"),
        Part("the monitor's probe images", probe, 0, "probe"),
    ]
    if not cuda:  # the device is the host
        parts = [Part(p.what, 0, p.device + p.host, p.drivers) for p in parts]
    return parts


def _sleep_bytes(cfg, circuit) -> float:
    """The noise and the response of the largest mirror batch among the sleeping synapses."""
    sleepers = circuit.sleeping_synapses()
    if not sleepers:
        return 0
    largest = 0
    for s in sleepers:
        pre, post = circuit.populations[s.pre].shape, circuit.populations[s.post].shape
        n = s.rule.mirror_batch(s.rule.sleep_phase.batch_size or cfg.batch_size, s.kind.positions(pre))
        largest = max(largest, n * (math.prod(pre) + math.prod(post)) * 4)
    return largest


def _check_batch_norm(cfg, facts: DataFacts, circuit) -> None:
    """Refuse a circuit whose batch norm would see one value per channel in some training batch:
    a population of 1×1 (the last stages of a ResNet on small images) in a batch of one image."""
    if circuit is None:
        return
    flat = [p for p in circuit.populations.values() if p.norm_kind and len(p.shape) == 3 and p.shape[1:] == (1, 1)]
    if not flat:
        return
    smallest, why = cfg.batch_size, f"--batch-size {cfg.batch_size}"
    if facts.train is not None and processes() == 1:
        n = min(facts.train, cfg.train_limit or facts.train)
        if n % cfg.batch_size:
            smallest = min(smallest, n % cfg.batch_size)
            why = f"the last batch of each epoch ({n} training images in batches of {cfg.batch_size})"
    if smallest > 1:
        return
    size = "×".join(map(str, facts.shape[1:]))
    raise UserError(f"batch norm needs more than one value per channel, and {why} gives one: on {size} images the "
                    f"population {flat[0].name} of {cfg.model} is 1×1. Use a --batch-size that leaves no batch of a "
                    f"single image" + (", or a larger --image-size" if facts.streamed else ""))


def _device(cfg):
    """The device ``cfg`` trains on (auto: the first CUDA GPU if there is one), with its index."""
    import torch

    spec = cfg.device
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0")) if processes() > 1 else torch.cuda.current_device()
        return torch.device("cuda", index)
    return torch.device(spec)


def host_memory() -> int:
    """Bytes of RAM this process may use: the machine's, or its control group's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _capacity(device) -> tuple[int, str]:
    """The memory of ``device`` (None: the host) and how a message names it."""
    if device is None:
        return host_memory(), "this machine's memory (RAM)"
    import torch

    props = torch.cuda.get_device_properties(device)
    return props.total_memory, f"{device} ({props.name})"


def _local_processes() -> int:
    """Processes of this run on this machine, which share its RAM (torchrun's LOCAL_WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _value(cfg, key: str):
    return config.flat_settings(cfg).get(key)


def _too_large(cfg, given, worst: Part, part: float, need: float, have: int, where: str, local: int) -> str:
    flat = config.flat_settings(cfg)
    drivers = [d.format(rule=cfg.rule) for d in _DRIVERS[worst.drivers]]
    drivers = [d for d in drivers if d in flat and _drives(cfg, d)]
    named = [d for d in drivers if d in given] or drivers
    shown = " and ".join(f"--{d.replace('_', '-')} {_show(flat[d])}" for d in named)
    each = f" ({local} processes on this machine)" if local > 1 else ""
    amount = _size(need) if _size(need).startswith("more") else f"at least {_size(need)}"
    return (f"{shown} make{'s' if len(named) == 1 else ''} this run too large for {where}: it would need {amount}"
            f"{each} ({worst.what}: {_size(part)}), and {where} has {_size(have)}; choose a smaller "
            f"{' or '.join('--' + d.replace('_', '-') for d in named)}")


def _drives(cfg, key: str) -> bool:
    """Whether setting ``key`` sizes anything in ``cfg``'s run (``--hidden`` does not in a ResNet)."""
    if key == "hidden":
        return MODELS[cfg.model].is_mlp
    if key == "width":
        return not MODELS[cfg.model].is_mlp
    if key == "image_size":
        return data_kind(cfg.data) == "folder"
    if key in ("synthetic_train", "synthetic_test"):
        return cfg.data == "synthetic"
    if key == "data":
        return data_kind(cfg.data) == "folder"
    return True


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _size(n: float) -> str:
    """``n`` bytes in binary units: ``23.4 GiB``; beyond any count of bytes, ``more than 8 EiB``."""
    if not math.isfinite(n) or n >= 2**63:
        return "more than 8 EiB"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"
