"""ProtoPNet acceptance: accuracy against the same backbone trained plainly, exactness of the push, and a
2-process push against a single-process one, written as a markdown table.

    python benchmarks/protopnet.py                    # 2000 training images at 32x32, 20 epochs, 2 seeds, CPU
    python benchmarks/protopnet.py --quick            # 600 images, 8 epochs, 1 seed (a smoke run: checks may fail)
    python benchmarks/protopnet.py --seeds 3 --out protopnet.md --accelerator gpu

Data: :class:`~lightning_xai.data.GroundTruthDataModule` (6 classes = the colour of the flower's disc, 32x32);
the backbone is the ``small_cnn`` of :mod:`lightning_xai.models.backbones` for both models, randomly initialised,
trained for the same number of epochs with Adam, the same learning rate and a cosine schedule (per stage for
ProtoPNet). ProtoPNet (Chen et al., NeurIPS 2019): ``--ppc`` prototypes per class in a 128-d latent space, paper
loss weights (0.8, 0.08, 1e-4), schedule 1 warm-up epoch, ``epochs - 1 - last`` joint epochs, push, ``--last``
last-layer epochs. Accuracies are on the test split after the last epoch (no model selection).

Checks:

* accuracy: ProtoPNet's mean test accuracy within 3 points of the plain ``ImageClassifier`` (mean over seeds);
* push exactness: every prototype equals, bit for bit, the latent vector of its recorded source patch (its image's
  latent map computed on its own, ``model.latent(image[None].contiguous())``; the generated images are stored
  channels-last, and the memory format changes the last bits of a convolution) and its distance to that patch,
  computed by the model's own expansion ``||z||^2 - 2 z.p + ||p||^2``, is 0 up to float32 rounding (reported);
* push optimality: the chosen patch is the nearest own-class training patch to the pre-push prototype, by a
  float64 brute force over every own-class latent patch (the pre-push state is captured just before the push),
  up to near-ties: the push ranks float32 distances of latents computed in batches of another size, so a patch
  whose float64 distance exceeds the minimum by at most 1e-5 of the prototype's squared norm counts as nearest
  (how often the exact argmin was chosen, and the largest gap, are reported);
* DDP: the pre-push model pushed by 2 processes (``torch.distributed``, gloo, sharded data; the same
  :meth:`~lightning_xai.models.protopnet.ProtoPNet.push` the training loop calls on every rank) selects the same
  (image, position) for every prototype as a single process, and the prototypes are bitwise equal.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

from lightning_xai.data import GroundTruthDataModule
from lightning_xai.models.classifier import ImageClassifier
from lightning_xai.models.protopnet import ProtoPNet, l2_distances
from lightning_xai.namespace import pl


class PrePush(pl.Callback):
    """Keeps the model state just before the push and the validation accuracy right before / after it.

    Callbacks' ``on_train_epoch_end`` runs before the LightningModule's (where the push happens).
    """

    def __init__(self, datamodule: pl.LightningDataModule) -> None:
        self.datamodule = datamodule
        self.state: dict[str, torch.Tensor] | None = None
        self.val_before: float | None = None
        self.val_after: float | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, module: ProtoPNet) -> None:
        if trainer.current_epoch in module.push_epochs:
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            self.val_before = accuracy(module, self.datamodule.dataset("val"))

    def on_train_epoch_start(self, trainer: pl.Trainer, module: ProtoPNet) -> None:
        if trainer.current_epoch - 1 in module.push_epochs:
            self.val_after = accuracy(module, self.datamodule.dataset("val"))


def accuracy(model: torch.nn.Module, dataset, batch_size: int = 256) -> float:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            x, y = dataset.images[start : start + batch_size], dataset.labels[start : start + batch_size]
            correct += int((model(x.to(model.device)).argmax(1).cpu() == y).sum())
    for m, training in modes:
        m.training = training
    return correct / len(dataset)


def trainer(args: argparse.Namespace, callbacks: list | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks or [],
    )


def datamodule(args: argparse.Namespace, seed: int) -> GroundTruthDataModule:
    return GroundTruthDataModule(
        num_classes=6,
        image_size=args.image_size,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        batch_size=64,
        seed=seed,
    )


def protopnet(args: argparse.Namespace) -> ProtoPNet:
    return ProtoPNet(
        "small_cnn",
        num_classes=6,
        prototypes_per_class=args.ppc,
        prototype_dim=128,
        warm_epochs=1,
        joint_epochs=args.epochs - 1 - args.last,
        last_layer_epochs=args.last,
        lr=args.lr,
        scheduler="cosine",
        explain_samples=0,
    )


def push_checks(model: ProtoPNet, pre_push: dict[str, torch.Tensor], train, args: argparse.Namespace) -> dict:
    """Exactness (bitwise, expanded distance) and optimality (float64 brute force) of the push record."""
    model = model.cpu().eval()
    before = pre_push["prototypes"].cpu().double().flatten(1)  # [P, D]
    # The pre-push model's latent maps of every training image (the push ran on that model: the last-layer stage
    # runs the trunk in eval mode, so the trunk is unchanged since - checked below).
    reference = protopnet(args)
    reference.load_state_dict(pre_push)
    reference.eval()
    with torch.no_grad():
        z = torch.cat([reference.latent(train.images[s : s + 256]) for s in range(0, len(train), 256)])
    n, d, h, w = z.shape
    patches = z.double().permute(0, 2, 3, 1).reshape(n, h * w, d)
    equal, optimal, exact_argmin, max_expanded, max_direct, max_gap = 0, 0, 0, 0.0, 0.0, 0.0
    for j in range(model.num_prototypes):
        cls = int(model.prototype_classes[j])
        idx, (row, col) = int(model.push_index[j]), model.push_position[j].tolist()
        with torch.no_grad():
            alone = model.latent(train.images[idx : idx + 1].contiguous())  # the image alone, contiguous memory
        vector = model.prototypes[j, :, 0, 0].detach()
        equal += bool(torch.equal(vector, alone[0, :, row, col])) and int(train.labels[idx]) == cls
        max_direct = max(max_direct, float((vector - alone[0, :, row, col]).abs().max()))
        expanded = float(l2_distances(alone, model.prototypes.detach())[0, j, row, col])
        max_expanded = max(max_expanded, expanded / float((vector**2).sum()))  # relative to ||p||^2
        own = (train.labels == cls).nonzero().flatten()
        dist = ((patches[own] - before[j]) ** 2).sum(-1)  # [n_own, h*w]
        flat = int(dist.flatten().argmin())
        exact_argmin += (int(own[flat // (h * w)]), flat % (h * w)) == (idx, row * w + col)
        # the push ranks float32 distances of latents computed in other batches: near-ties may swap
        chosen = float(dist[int((own == idx).nonzero()), row * w + col])
        gap = (chosen - float(dist.min())) / float((before[j] ** 2).sum())
        max_gap = max(max_gap, gap)
        optimal += gap <= 1e-5
    trunk_unchanged = all(
        torch.equal(a, b)
        for a, b in zip(reference.features.state_dict().values(), model.features.state_dict().values())
    )
    return {
        "equal": equal,
        "optimal": optimal,
        "exact_argmin": exact_argmin,
        "max_gap": max_gap,
        "max_expanded": max_expanded,
        "max_direct": max_direct,
        "trunk_unchanged": trunk_unchanged,
    }


def _ddp_worker(rank: int, world: int, init_file: str, state_path: str, args_dict: dict, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        args = argparse.Namespace(**args_dict)
        model = protopnet(args)
        model.load_state_dict(torch.load(state_path))
        model.push(datamodule(args, args.seed).dataset("train"), batch_size=64)
        if rank == 0:
            torch.save(
                {"index": model.push_index, "position": model.push_position, "prototypes": model.prototypes}, out
            )
    finally:
        torch.distributed.destroy_process_group()


def ddp_check(args: argparse.Namespace, pre_push: dict[str, torch.Tensor]) -> dict[str, object]:
    """Push the pre-push model with 2 processes and with 1; compare the selections."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        state_path, out = os.path.join(tmp, "state.pt"), os.path.join(tmp, "ddp.pt")
        torch.save(pre_push, state_path)
        init_file = os.path.join(tmp, "init")
        t0 = time.time()
        mp.spawn(_ddp_worker, args=(2, init_file, state_path, vars(args), out), nprocs=2, join=True)
        ddp_seconds = time.time() - t0
        ddp = torch.load(out)
    single = protopnet(args)
    single.load_state_dict(pre_push)
    t0 = time.time()
    single.push(datamodule(args, args.seed).dataset("train"), batch_size=64)
    single_seconds = time.time() - t0
    same = (ddp["index"] == single.push_index) & (ddp["position"] == single.push_position).all(dim=1)
    return {
        "same": int(same.sum()),
        "bitwise": bool(torch.equal(ddp["prototypes"], single.prototypes.detach())),
        "ddp_seconds": ddp_seconds,
        "single_seconds": single_seconds,
    }


def run(args: argparse.Namespace) -> list[str]:
    plain_acc, proto_acc, rows, times = [], [], [], {"plain": 0.0, "protopnet": 0.0}
    checks: dict[str, dict] = {}
    for k in range(args.seeds):
        seed = args.seed + k
        pl.seed_everything(seed, verbose=False)
        dm = datamodule(args, seed)
        plain = ImageClassifier("small_cnn", num_classes=6, lr=args.lr, scheduler="cosine")
        t0 = time.time()
        trainer(args).fit(plain, dm)
        times["plain"] += time.time() - t0
        plain_acc.append(accuracy(plain, dm.dataset("test")))

        pl.seed_everything(seed, verbose=False)
        model = protopnet(args)
        capture = PrePush(dm)
        t0 = time.time()
        trainer(args, [capture]).fit(model, dm)
        times["protopnet"] += time.time() - t0
        proto_acc.append(accuracy(model, dm.dataset("test")))
        rows.append(
            f"| {seed} | {100 * plain_acc[-1]:.1f} | {100 * proto_acc[-1]:.1f} | {100 * capture.val_before:.1f} | "
            f"{100 * capture.val_after:.1f} | {100 * accuracy(model, dm.dataset('val')):.1f} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)  # progress: survives an interrupted run
        if k == 0:
            checks["push"] = push_checks(model, capture.state, dm.dataset("train"), args)
            if not args.skip_ddp:
                checks["ddp"] = ddp_check(argparse.Namespace(**{**vars(args), "seed": seed}), capture.state)

    P = 6 * args.ppc
    mean_plain, mean_proto = 100 * sum(plain_acc) / len(plain_acc), 100 * sum(proto_acc) / len(proto_acc)
    gap = mean_plain - mean_proto
    lines = [
        "# ProtoPNet benchmark",
        "",
        f"GroundTruthDataModule, 6 classes, {args.image_size}x{args.image_size}, {args.n_train} train / {args.n_val} "
        f"val / {args.n_test} test images; small_cnn; {args.epochs} epochs (ProtoPNet: 1 warm, "
        f"{args.epochs - 1 - args.last} joint, push, {args.last} last-layer), Adam lr {args.lr}, cosine; "
        f"{args.ppc} prototypes per class ({P} in all). torch {torch.__version__}, {args.accelerator}, "
        f"{torch.get_num_threads()} threads.",
        "",
        "## Accuracy (%)",
        "",
        "| seed | plain test | ProtoPNet test | ProtoPNet val before push | val right after push | final val |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Training time over all seeds: plain {times['plain']:.0f} s, ProtoPNet {times['protopnet']:.0f} s.",
        "",
        "## Checks",
        "",
        "| check | measured | target | pass |",
        "|---|---|---|---|",
        f"| ProtoPNet test accuracy vs plain (mean over {args.seeds} seed(s)) | {mean_proto:.1f} vs {mean_plain:.1f} "
        f"(gap {gap:+.1f} points) | gap <= 3 | {'yes' if gap <= 3 else 'NO'} |",
    ]
    push = checks["push"]
    lines += [
        f"| prototypes bitwise equal to their source patch's latent vector, source of own class | {push['equal']}/{P} "
        f"| {P}/{P} | {'yes' if push['equal'] == P else 'NO'} |",
        f"| max distance prototype - source patch, expanded form (float32), relative to the prototype's squared norm "
        f"| {push['max_expanded']:.1e} | 0 up to float32 cancellation (<= 1e-5) | "
        f"{'yes' if push['max_expanded'] <= 1e-5 else 'NO'} |",
        f"| max abs difference prototype - source patch vector | {push['max_direct']:.1e} | 0 | "
        f"{'yes' if push['max_direct'] == 0 else 'NO'} |",
        f"| chosen patch = nearest own-class training patch (float64 brute force; distance within 1e-5 of the "
        f"prototype's squared norm of the minimum) | {push['optimal']}/{P} (the argmin itself: "
        f"{push['exact_argmin']}/{P}; largest gap {push['max_gap']:.1e}) | {P}/{P} | "
        f"{'yes' if push['optimal'] == P else 'NO'} |",
        f"| trunk unchanged by the last-layer stage | {push['trunk_unchanged']} | True | "
        f"{'yes' if push['trunk_unchanged'] else 'NO'} |",
    ]
    if "ddp" in checks:
        ddp = checks["ddp"]
        lines += [
            f"| 2-process push selects the same (image, position) as 1 process | {ddp['same']}/{P} | {P}/{P} | "
            f"{'yes' if ddp['same'] == P else 'NO'} |",
            f"| 2-process prototypes bitwise equal to 1-process ones | {ddp['bitwise']} | True | "
            f"{'yes' if ddp['bitwise'] else 'NO'} |",
            "",
            f"Push time on {args.n_train} images: 1 process {ddp['single_seconds']:.1f} s, 2 processes "
            f"{ddp['ddp_seconds']:.1f} s (including process start-up).",
        ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="600 images, 8 epochs, 1 seed")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--last", type=int, default=5, help="last-layer epochs")
    parser.add_argument("--ppc", type=int, default=5, help="prototypes per class")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam rate of both models (SmallCNN: 1e-2)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_val, args.n_test, args.epochs, args.last, args.seeds = 600, 200, 300, 8, 2, 1
    if args.epochs - 1 - args.last < 1:
        parser.error("--epochs must leave at least one joint epoch: epochs >= last + 2")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    lines = run(args)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
