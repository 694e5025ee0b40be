#!/usr/bin/env python
"""Train ANODE's ODE-ResNet on CIFAR-10 under a memory budget: ANODE's train.py, planned by anode-plan.

    python examples/train_cifar10.py --budget 300MB --method rk2 --nt 2 --device cuda
    python examples/train_cifar10.py --fake-data 256 --epochs 2 --batch-size 32 --width 8   # no download

The model is compiled once, on the first training batch, with
``anode_plan.compile(model, memory_budget=..., example_inputs=(x,))``, and trained with the
compiled model in an ordinary loop (SGD, momentum 0.9, weight decay 5e-4). Every batch has the
planned size (``drop_last=True``); evaluation runs under ``torch.no_grad()``, where the compiled
model runs its layers straight through.

Learning rate: ``--schedule step`` (the default) is ANODE's step schedule: the rate divided by
10 after fixed epochs (MultiStepLR, gamma 0.1, after each of ``--milestones``; by default after
3/7 and 5/7 of ``--epochs``, which for ANODE's 350 epochs is its lr_schedule: lr/10 after epoch
150, lr/100 after 250). ``--schedule cosine`` anneals it to 0 over ``--epochs``
(CosineAnnealingLR). The defaults are ANODE train.py's: 350 epochs, batch 256, lr 0.1, Euler
with Nt=2.

Memory: once per epoch, the first training step's forward and backward run under
``anode_plan.measure_peak_memory``: the allocator's peak on top of what was allocated when the
step began (parameters, optimizer state and the batch excluded, as the budget counts them). On
CUDA that is ``torch.cuda.max_memory_allocated()``; on the CPU the profiler-based meter, which
slows the measured step, so the step time is the mean of the other steps (forward, backward
and optimizer step, without data loading).

Outputs: a checkpoint every epoch (``--checkpoint``: model, optimizer, scheduler, epoch, best
test accuracy), the dataset (``--data``) and ``--json-log`` (one JSON record per epoch) go
under ``out/`` of the checkout by default. ``--resume PATH`` continues from a checkpoint: the
next epoch, the saved learning-rate schedule, the same data order and augmentation as an
uninterrupted run (each epoch's randomness is seeded by ``--seed`` and the epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import transforms  # noqa: E402
from tqdm import tqdm  # noqa: E402

import anode_plan  # noqa: E402
from anode_plan import PLANNER_NAMES  # noqa: E402
from models import ModelConfigError, ode_resnet  # noqa: E402
from planners import format_bytes  # noqa: E402

OUT = os.path.join(ROOT, "out")
# ANODE's train.py normalises with these CIFAR-10 channel means and standard deviations.
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
DEFAULT_BUDGET_FRACTION = 0.4  # of the way from the minimum budget to store-all, as tools/demo.py
# What a checkpoint must have been trained with to be resumed (the rest of the schedule is in its state).
CHECKED_FLAGS = ("width", "stages", "blocks_per_stage", "nt", "method", "norm", "seed", "schedule")


class TrainScriptError(Exception):
    """A command-line input this script cannot use; printed as one line, exit status 2."""


@dataclass(frozen=True)
class EpochRecord:
    """One epoch's results, as printed and written to ``--json-log``."""

    epoch: int
    epochs: int
    lr: float
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    peak_bytes: int
    budget_bytes: int
    predicted_peak_bytes: int
    peak_method: str
    peak_kernel: str | None
    step_ms: float
    timed_steps: int
    epoch_s: float


@dataclass(frozen=True)
class TrainedEpoch:
    """What one pass over the training set gave: its mean loss and accuracy, and what was measured."""

    loss: float
    accuracy: float
    measured: anode_plan.MemoryMeasurement  # the first step's forward and backward
    step_ms: float  # mean over the other steps: forward, backward and optimizer step
    timed_steps: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", help="memory budget of a training step, e.g. 300MB, 256MiB or bytes (default: "
                   f"{DEFAULT_BUDGET_FRACTION:.0%}% of the way from the smallest feasible budget to store-all, "
                   "measured on the first batch)")
    p.add_argument("--planner", default="auto", choices=sorted(PLANNER_NAMES), help="anode-plan planner (default auto)")
    p.add_argument("--method", default="euler", choices=["euler", "rk2", "rk4"], help="ODE solver (default euler)")
    p.add_argument("--nt", type=int, default=2, help="time steps per ODE block (default 2, as ANODE's train.py)")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage (default 16)")
    p.add_argument("--stages", type=int, default=3, help="stages, each doubling the channels (default 3)")
    p.add_argument("--blocks-per-stage", type=int, default=1, help="ODE blocks per stage (default 1)")
    p.add_argument("--norm", default="batch", choices=["batch", "group"], help="normalisation (default batch)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, data order and augmentation (default 0)")
    p.add_argument("--epochs", type=int, default=200, help="epochs to train in all (default 350, as ANODE)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="training batch, the planned size (default 256, as ANODE)")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate (default 0.1)")
    p.add_argument("--schedule", default="step", choices=["step", "cosine"],
                   help="step: MultiStepLR, lr/10 after each of --milestones (ANODE's); cosine: "
                        "CosineAnnealingLR to 0 over --epochs (default step)")
    p.add_argument("--milestones", type=int, nargs="+",
                   help="epochs after which --schedule step divides the lr by 10 (default: 3/7 and 5/7 of --epochs, "
                        "150 and 250 for 350 epochs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="cpu or cuda (default cuda when there is one)")
    p.add_argument("--data", default=os.path.join(OUT, "data"), help="CIFAR-10 root, downloaded there if missing "
                   "(default out/data)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    p.add_argument("--fake-data", type=int, metavar="N", help="train on torchvision FakeData: N random 3x32x32 "
                   "images with random labels (and N/4 test images), no download")
    p.add_argument("--checkpoint", default=os.path.join(OUT, "train_cifar10", "checkpoint.pt"),
                   help="written after every epoch (default out/train_cifar10/checkpoint.pt)")
    p.add_argument("--resume", metavar="PATH", help="continue from a checkpoint this script wrote")
    p.add_argument("--json-log", metavar="PATH", help="write one JSON record per epoch (appended to when resuming)")
    p.add_argument("--no-augment", action="store_true", help="no random crop and flip: to check that a small set "
                   "is memorised (the training loss falls), not for real training")
    p.add_argument("--no-progress", action="store_true",
                   help="no tqdm progress bars (by default they show when stderr is a terminal)")
    args = p.parse_args(argv)
    for flag in ("nt", "width", "stages", "blocks_per_stage", "epochs", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.workers < 0:
        p.error(f"--workers must be 0 or more, got {args.workers}")
    if args.fake_data is not None and args.fake_data < args.batch_size:
        p.error(f"--fake-data {args.fake_data} holds fewer images than one batch (--batch-size {args.batch_size}); "
                "give at least as many images as the batch size")
    if args.lr <= 0:
        p.error(f"--lr must be positive, got {args.lr}")
    return args


def datasets(args: argparse.Namespace) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    normalize = transforms.Normalize(MEAN, STD)
    augment = [] if args.no_augment else [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    train_tf = transforms.Compose([*augment, transforms.ToTensor(), normalize])
    test_tf = transforms.Compose([transforms.ToTensor(), normalize])
    if args.fake_data is not None:
        n = args.fake_data
        # FakeData draws image i from seed random_offset + i: a fixed set, and a disjoint one for testing.
        train = torchvision.datasets.FakeData(size=n, image_size=(3, 32, 32), num_classes=10, transform=train_tf)
        test = torchvision.datasets.FakeData(size=max(n // 4, 1), image_size=(3, 32, 32), num_classes=10,
                                             transform=test_tf, random_offset=n)
        return train, test
    try:
        train = torchvision.datasets.CIFAR10(root=args.data, train=True, download=True, transform=train_tf)
        test = torchvision.datasets.CIFAR10(root=args.data, train=False, download=True, transform=test_tf)
    except (OSError, RuntimeError) as error:
        raise TrainScriptError(f"could not load or download CIFAR-10 into --data {args.data!r} ({error}); check the "
                               "network and the directory, or try the script with --fake-data 256") from None
    return train, test


def train_loader(train_set, args: argparse.Namespace, epoch: int) -> DataLoader:
    """The loader of one epoch: its shuffle and workers' augmentation seeded by (seed, epoch), as on a resume."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
    return DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=generator,
                      num_workers=args.workers, pin_memory=args.device == "cuda",
                      persistent_workers=False)


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace):
    if args.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    milestones = args.milestones or sorted({max(1, round(args.epochs * k / 7)) for k in (3, 5)})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def checked_config(args: argparse.Namespace) -> dict:
    return {flag: getattr(args, flag) for flag in CHECKED_FLAGS}


def load_checkpoint(path: str, args: argparse.Namespace) -> dict:
    if not os.path.isfile(path):
        raise TrainScriptError(f"--resume {path!r}: no such file; give a checkpoint this script wrote (--checkpoint)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: say which, not the unpickler's traceback
        raise TrainScriptError(f"--resume {path!r} could not be read as a checkpoint ({type(error).__name__}: "
                               f"{error})") from None
    if not isinstance(saved, dict) or "config" not in saved:
        raise TrainScriptError(f"--resume {path!r} is not a checkpoint of examples/train_cifar10.py")
    differ = [f"--{k.replace('_', '-')} {saved['config'].get(k)} saved, {v} given"
              for k, v in checked_config(args).items() if saved["config"].get(k) != v]
    if differ:
        raise TrainScriptError(f"--resume {path!r} was trained with other settings: {'; '.join(differ)}. Give the "
                               "flags it was trained with")
    if saved["epoch"] >= args.epochs:
        raise TrainScriptError(f"--resume {path!r} has trained {saved['epoch']} epochs already and --epochs is "
                               f"{args.epochs}; give a larger --epochs to train on")
    return saved


def default_budget(model, x: torch.Tensor, planner: str) -> tuple[int, anode_plan.BudgetLandmarks]:
    """The default budget, a fraction of the way from ``planner``'s minimum to store-all, measured on ``x``."""
    traced = anode_plan.trace_model(model, (x,))
    marks = anode_plan.find_landmarks(anode_plan.lower_to_chain(model, traced, (x,)), PLANNER_NAMES[planner]())
    span = marks.store_all_bytes - marks.minimum_bytes
    return marks.minimum_bytes + int(span * DEFAULT_BUDGET_FRACTION), marks


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress_bar(loader: DataLoader, desc: str, args: argparse.Namespace) -> tqdm:
    """tqdm over ``loader``, shown while stderr is a terminal (tqdm's ``disable=None``), never with --no-progress."""
    return tqdm(loader, desc=desc, leave=False, disable=True if args.no_progress else None, dynamic_ncols=True)


def train_epoch(compiled, optimizer, loader, device, epoch: int, args: argparse.Namespace) -> TrainedEpoch:
    """One epoch: the first step measured by the allocator meter, the others timed."""
    compiled.train()
    loss_sum, correct, seen, step_ms = 0.0, 0, 0, []
    measured = None
    bar = progress_bar(loader, f"epoch {epoch}/{args.epochs} train", args)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        out: dict = {}

        def forward_backward() -> None:
            out["logits"] = compiled(x)
            out["loss"] = F.cross_entropy(out["logits"], y)
            out["loss"].backward()

        if measured is None:
            measured = anode_plan.measure_peak_memory(forward_backward, device=device)
            optimizer.step()
        else:
            synchronize(device)
            began = time.perf_counter()
            forward_backward()
            optimizer.step()
            synchronize(device)
            step_ms.append((time.perf_counter() - began) * 1e3)
        loss_sum += out["loss"].item() * y.numel()
        correct += (out["logits"].argmax(1) == y).sum().item()
        seen += y.numel()
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.2%}")
    bar.close()
    if measured is None:
        raise TrainScriptError(f"the training set gives no full batch of {args.batch_size}; lower --batch-size")
    mean_ms = sum(step_ms) / len(step_ms) if step_ms else measured.time_ms
    return TrainedEpoch(loss_sum / seen, correct / seen, measured, mean_ms, len(step_ms))


@torch.no_grad()
def evaluate(compiled, loader, device, epoch: int, args: argparse.Namespace) -> tuple[float, float]:
    compiled.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = progress_bar(loader, f"epoch {epoch}/{args.epochs} test", args)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = compiled(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.numel()
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.2%}")
    bar.close()
    return loss_sum / seen, correct / seen


def format_epoch(r: EpochRecord) -> str:
    within = "within" if r.peak_bytes <= r.budget_bytes else "OVER"
    return (f"epoch {r.epoch}/{r.epochs}  lr {r.lr:.4g}  train loss {r.train_loss:.4f} acc {r.train_acc:.2%}  "
            f"test loss {r.test_loss:.4f} acc {r.test_acc:.2%}  peak {format_bytes(r.peak_bytes)} of budget "
            f"{format_bytes(r.budget_bytes)} ({r.peak_bytes / r.budget_bytes:.0%}, {within}; predicted "
            f"{format_bytes(r.predicted_peak_bytes)})  step {r.step_ms:.1f} ms  ({r.epoch_s:.1f} s)")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainScriptError("--device cuda was given but torch sees no CUDA device; use --device cpu")
    budget = args.budget  # a string: "300MB", "256MiB", or bare digits (bytes)
    if budget is not None:
        anode_plan.parse_memory_budget(budget)  # a malformed budget fails before any data is read
    saved = load_checkpoint(args.resume, args) if args.resume else None
    train_set, test_set = datasets(args)
    test_loader = DataLoader(test_set, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)

    try:
        model = ode_resnet(width=args.width, stages=args.stages, blocks_per_stage=args.blocks_per_stage, nt=args.nt,
                           method=args.method, norm=args.norm, seed=args.seed)
    except ModelConfigError as error:
        raise TrainScriptError(str(error)) from None
    model.to(device).train()
    if saved is not None:
        model.load_state_dict(saved["model"])

    # The plan is made on a batch shaped like every training batch: the training set's first, unshuffled.
    x = next(iter(DataLoader(train_set, batch_size=args.batch_size)))[0].to(device)
    marks = None
    if budget is None:
        budget, marks = default_budget(model, x, args.planner)
    compiled = anode_plan.compile(model, memory_budget=budget, example_inputs=(x,), planner=args.planner)
    plan = compiled.plan
    if marks is None:
        marks = anode_plan.find_landmarks(plan.chain, PLANNER_NAMES[args.planner]())
    print(anode_plan.format_report(plan, marks), flush=True)

    optimizer = torch.optim.SGD(compiled.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    scheduler = make_scheduler(optimizer, args)
    start, best_acc = 1, 0.0
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        start, best_acc = saved["epoch"] + 1, saved["best_acc"]
        print(f"\nresumed from {args.resume}: {saved['epoch']} epochs done, best test accuracy {best_acc:.2%}; "
              f"continuing at epoch {start} with lr {optimizer.param_groups[0]['lr']:.4g} (the saved schedule)")
    milestones = getattr(scheduler, "milestones", None)
    source = "fake" if args.fake_data else "CIFAR-10"
    print(f"\ntraining from epoch {start} to {args.epochs} on {len(train_set)} {source} "
          f"images (batch {args.batch_size}, {len(train_set) // args.batch_size} steps an epoch) on {device}; "
          f"SGD lr {args.lr:g} momentum 0.9 weight decay 5e-4, "
          + (f"lr/10 after epochs {sorted(milestones)}" if milestones is not None else "cosine schedule") + "; "
          f"peak measured on each epoch's first step ({'cuda' if device.type == 'cuda' else 'cpu'}-allocator)",
          flush=True)

    for path in filter(None, (args.checkpoint, args.json_log)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    log = open(args.json_log, "a" if saved is not None else "w") if args.json_log else None
    over = 0
    try:
        for epoch in range(start, args.epochs + 1):
            began = time.perf_counter()
            torch.manual_seed(args.seed * 1_000_003 + epoch)  # the main process's augmentation (--workers 0)
            lr = optimizer.param_groups[0]["lr"]
            trained = train_epoch(compiled, optimizer, train_loader(train_set, args, epoch), device, epoch, args)
            test_loss, test_acc = evaluate(compiled, test_loader, device, epoch, args)
            scheduler.step()
            best_acc = max(best_acc, test_acc)
            measured = trained.measured
            record = EpochRecord(epoch, args.epochs, lr, trained.loss, trained.accuracy, test_loss, test_acc,
                                 measured.peak_bytes, compiled.plan.budget_bytes, compiled.plan.predicted_peak_bytes,
                                 measured.method, measured.kernel, trained.step_ms, trained.timed_steps,
                                 time.perf_counter() - began)
            over += record.peak_bytes > record.budget_bytes
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": epoch, "best_acc": best_acc,
                        "config": checked_config(args), "budget_bytes": compiled.plan.budget_bytes},
                       args.checkpoint)
            print(format_epoch(record), flush=True)
            if log is not None:
                log.write(json.dumps(asdict(record)) + "\n")
                log.flush()
    finally:
        if log is not None:
            log.close()
    print(f"best test accuracy {best_acc:.2%}; checkpoint {args.checkpoint}")
    if over:
        print(f"the measured peak exceeded the budget in {over} epoch(s)", file=sys.stderr)
    return 1 if over else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (anode_plan.AnodePlanError, TrainScriptError) as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
