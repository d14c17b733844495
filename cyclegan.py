r"""CycleGAN -- "Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial Networks",
Zhu, Park, Isola, Efros (ICCV 2017), arXiv:1703.10593v7.

What it adds: no pairs at all. Two generators, G: A -> B and F: B -> A, each with its own D, and a
cycle: F(G(a)) must give a back and G(F(b)) must give b back. The cycle ties each output to its
input, so G cannot answer every input with the same realistic image. The translation is
deterministic: one output per input (no z), which is the gap BicycleGAN and MUNIT fill.

Full objective, Eq. (3), solved as Eq. (4) G^*, F^* = \arg\min_{G,F} \max_{D_A,D_B} L(G, F, D_A, D_B):
    \mathcal{L}(G, F, D_A, D_B) = \mathcal{L}_{GAN}(G, D_B, A, B) + \mathcal{L}_{GAN}(F, D_A, B, A)
                                  + \lambda \mathcal{L}_{cyc}(G, F)
plus, as the official training scripts use, the identity term of §5.2,
    \lambda_{idt} \lambda (E||G(b) - b||_1 + E||F(a) - a||_1),
with every L_GAN in the least-squares form of §4.

Symbols (paper -> code):
    X, Y (domains)       A, B: real_A, real_B (--direction BtoA swaps them)
    G: X -> Y            G  (the official code's netG_A);  fake_B = G(real_A), rec_B = G(fake_A)
    F: Y -> X            F  (netG_B);                      fake_A = F(real_B), rec_A = F(fake_B)
    D_X, D_Y             D_A judges domain A, D_B judges domain B. Careful when cross-reading: the
                         official netD_A judges domain B (it sits after netG_A), i.e. it is our D_B.
    lambda               --lambda-cyc 10 (§4, both cycles)
    identity weight      --lambda-idt 0.5, times lambda (§5.2 and the official scripts); idt_B is the
                         term G(real_B) ~ real_B (the official code calls it loss_idt_A)

Update order, per batch of 1 (official code): forward G and F; G step first with D_A and D_B
frozen (GAN + cycle + identity, one optimizer for G and F); then the D step (one optimizer for
D_A and D_B), each D on a real image and on a fake drawn from a pool of 50 past fakes, loss x 1/2.

Deviations:
- From the paper: none intended. The paper's Eq. (1) is the log form; §4 replaces it with the
  least-squares form, which is what is trained here (--gan-mode vanilla gives the log form).
- From the official code: the network widths on the toy data are 16 (64 elsewhere); the 6 or 9
  residual blocks are picked from the crop size (9 at >= 256 px) unless --n-blocks is given.
- Test images are resized to the test size (--crop-size, else the training one), both directions are
  written (test/AtoB, test/BtoA); --input translates own images with G (A -> B) at their own size.

Usage:
    python cyclegan.py                                   # built-in toy data (outlines -> filled shapes)
    python cyclegan.py --dataset horse2zebra             # downloads it, 100 + 100 epochs
    python cyclegan.py --dataset horse2zebra --test
"""
import argparse
from pathlib import Path

import torch

import common

# ---------------------------------------------------------------------------------------------
# 2. Options (defaults: paper §4 and the official training scripts; per-dataset ones in common)
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="CycleGAN (arXiv:1703.10593): unpaired cycle-consistent translation")
    p.add_argument("--dataset", default="toy", help="toy (built-in), a known name (horse2zebra, monet2photo, ...), "
                   "a folder with trainA/ trainB/ testA/ testB/, or a paired folder (left halves A, right halves B)")
    p.add_argument("--direction", choices=["AtoB", "BtoA"], help="BtoA swaps the two domains (default AtoB)")
    p.add_argument("--load-size", type=int, help="resize to this square size, then crop (default: per dataset)")
    p.add_argument("--crop-size", type=int, help="training crop size = network input size (default: per dataset)")
    p.add_argument("--input-nc", type=int, help="channels of domain A (default: per dataset)")
    p.add_argument("--output-nc", type=int, default=3, help="channels of domain B")
    p.add_argument("--batch-size", type=int, default=1, help="paper §4: 1"
                   "; per process under torchrun (README, Multi-GPU)")
    p.add_argument("--epochs", type=int, help="epochs at the initial learning rate (paper: 100)")
    p.add_argument("--epochs-decay", type=int, help="epochs of linear decay to zero (paper: 100)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (paper §4)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (official code)")
    p.add_argument("--ngf", type=int, help="G and F width (default 64; 16 on the toy data)")
    p.add_argument("--ndf", type=int, help="D width (default 64; 16 on the toy data)")
    p.add_argument("--n-blocks", type=int, help="residual blocks in G and F (default: 9 at >= 256 px, else 6)")
    p.add_argument("--norm", default="instance", choices=["instance", "batch", "layer", "none"])
    p.add_argument("--gan-mode", default="lsgan", choices=["lsgan", "vanilla"], help="paper §4: least squares")
    p.add_argument("--lambda-cyc", type=float, default=10.0, help="lambda of Eq. (3), both cycles (paper §4)")
    p.add_argument("--lambda-idt", type=float, default=0.5, help="identity weight x lambda (§5.2); 0: off")
    p.add_argument("--pool-size", type=int, default=50, help="past fakes kept per D (paper §4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=int, default=2, help="data-loading processes")
    common.add_speed_flags(p)  # --amp --channels-last --compile --no-cache
    p.add_argument("--out", help="run folder (default runs/cyclegan_<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/latest.pt (or --checkpoint)")
    p.add_argument("--checkpoint", help="checkpoint file for --resume and --test (default <out>/latest.pt)")
    p.add_argument("--max-iters", type=int, help="stop after this many iterations and print images/s")
    p.add_argument("--log-every", type=int, default=50, help="iterations between loss logs")
    p.add_argument("--quick", action="store_true", help="smoke run: toy data, narrow nets, 20 iterations")
    p.add_argument("--test", action="store_true", help="translate the test split both ways instead of training")
    p.add_argument("--n-samples", type=int, default=1, help="CycleGAN is deterministic: always one output per input")
    p.add_argument("--num-test", type=int, default=100, help="test inputs per domain")
    common.add_inference_flags(p, style=False, interpolate=False)  # --input --half --resize (A -> B with G)
    args = common.parse_with_quick(p, argv, ngf=16, ndf=16, num_workers=0)
    common.resolve_options(args, layout="unpaired")
    common.check_options(args, __file__)  # counts, rates, --device, --out: one sentence for a bad value
    if args.n_blocks is None:
        args.n_blocks = 9 if args.crop_size >= 256 else 6
    if args.crop_size % 4:
        common.fail(f"--crop-size {args.crop_size} is not a multiple of 4, which G's two down/up-samplings need")
    return args


# ---------------------------------------------------------------------------------------------
# 3. Networks: two ResNet generators and two 70x70 PatchGANs, all shared blocks
# ---------------------------------------------------------------------------------------------
def build_networks(args, device):
    G = common.ResnetGenerator(args.input_nc, args.output_nc, args.ngf, args.n_blocks, args.norm)
    F = common.ResnetGenerator(args.output_nc, args.input_nc, args.ngf, args.n_blocks, args.norm)
    D_A = common.PatchDiscriminator(args.input_nc, args.ndf, norm=args.norm, num_scales=1)
    D_B = common.PatchDiscriminator(args.output_nc, args.ndf, norm=args.norm, num_scales=1)
    # Official CycleGAN init: weights ~ N(0, 0.02), biases 0.
    return [common.init_weights(net, "normal", 0.02).to(device) for net in (G, F, D_A, D_B)]


# ---------------------------------------------------------------------------------------------
# 4. Loss terms
# ---------------------------------------------------------------------------------------------
def generator_gan_loss(D, fake, mode="lsgan"):
    # Eq. (1), G's side in the least-squares form of §4: min_G E[(D(G(x)) - 1)^2]
    return common.gan_loss(D(fake), True, mode)


def discriminator_loss(D, real, fake, mode="lsgan"):
    # Eq. (1), D's side in the least-squares form of §4: min_D E[(D(y) - 1)^2] + E[D(G(x))^2]
    # Training details of the paper and the official code: the sum is halved to slow D relative to G.
    return 0.5 * (common.gan_loss(D(real), True, mode) + common.gan_loss(D(fake.detach()), False, mode))


def cycle_loss(rec, real):
    # Eq. (2): L_cyc(G, F) = E|| F(G(a)) - a ||_1 + E|| G(F(b)) - b ||_1   (one of the two terms)
    return (rec - real).abs().mean()


def identity_loss(same, real):
    # CycleGAN §5.2, identity loss: L_identity = E|| G(b) - b ||_1 + E|| F(a) - a ||_1   (one term)
    return (same - real).abs().mean()


# ---------------------------------------------------------------------------------------------
# 5. Training step: forward both cycles, G step (Ds frozen), then the D step on pooled fakes
# ---------------------------------------------------------------------------------------------
def train_step(nets, optims, pools, real_A, real_B, args):
    G, F, D_A, D_B = nets
    opt_G, opt_D = optims
    pool_A, pool_B = pools

    # The two cycles: A -> B -> A and B -> A -> B
    fake_B = G(real_A)
    rec_A = F(fake_B)
    fake_A = F(real_B)
    rec_B = G(fake_A)

    # Eq. (4): G and F minimise the objective, D_A and D_B maximise it: one G step, then one D step.
    # G step (G and F together). D_A and D_B are frozen, so G's GAN terms leave their gradients empty.
    common.set_requires_grad([D_A, D_B], False)
    opt_G.zero_grad(set_to_none=True)
    loss_G = generator_gan_loss(D_B, fake_B, args.gan_mode)
    loss_F = generator_gan_loss(D_A, fake_A, args.gan_mode)
    # Eq. (3): lambda weighs both cycle terms of Eq. (2)
    loss_cycle_A = args.lambda_cyc * cycle_loss(rec_A, real_A)
    loss_cycle_B = args.lambda_cyc * cycle_loss(rec_B, real_B)
    loss_idt_A = loss_idt_B = torch.zeros((), device=real_A.device)
    if args.lambda_idt > 0:  # G(b) should be b and F(a) should be a (needs equal channel counts)
        loss_idt_B = args.lambda_idt * args.lambda_cyc * identity_loss(G(real_B), real_B)
        loss_idt_A = args.lambda_idt * args.lambda_cyc * identity_loss(F(real_A), real_A)
    (loss_G + loss_F + loss_cycle_A + loss_cycle_B + loss_idt_A + loss_idt_B).backward()
    opt_G.step()

    # D step (D_A and D_B together), each on a real image and on a fake from its pool of past fakes
    common.set_requires_grad([D_A, D_B], True)
    opt_D.zero_grad(set_to_none=True)
    loss_D_A = discriminator_loss(D_A, real_A, pool_A.query(fake_A), args.gan_mode)
    loss_D_B = discriminator_loss(D_B, real_B, pool_B.query(fake_B), args.gan_mode)
    (loss_D_A + loss_D_B).backward()
    opt_D.step()
    return {"G": loss_G, "F": loss_F, "cycle_A": loss_cycle_A, "cycle_B": loss_cycle_B,
            "idt_A": loss_idt_A, "idt_B": loss_idt_B, "D_A": loss_D_A, "D_B": loss_D_B}


# ---------------------------------------------------------------------------------------------
# 6. Sampling and test
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def translate(forward, backward, real):
    """One batch through one direction -> (translation, reconstruction after the way back)."""
    fake = forward(real)
    return fake, backward(fake)


def sample_grid(G, F, items, path, device):
    """Training preview: per row, real_A | G(real_A) | F(G(real_A)) | real_B | F(real_B) | G(F(real_B))."""
    G.eval(), F.eval()
    real_A = torch.stack([item["A"] for item in items]).to(device)
    real_B = torch.stack([item["B"] for item in items]).to(device)
    fake_B, rec_A = translate(G, F, real_A)
    fake_A, rec_B = translate(F, G, real_B)
    common.save_grid([list(row) for row in zip(real_A, fake_B, rec_A, real_B, fake_A, rec_B)], path)
    G.train(), F.train()


def test(args, device):
    out = common.default_out(args, __file__)
    ckpt = common.load_checkpoint(args.checkpoint or out / "latest.pt", device, args)
    G, F, _, _ = build_networks(args, device)
    G.load_state_dict(ckpt["G"]), F.load_state_dict(ckpt["F"])
    G.eval(), F.eval()
    if args.input:  # own images of domain A, each at its own size (G's two down-samplings: multiples of 4)
        return common.translate_own_images(args, device, lambda real_A, _: G(real_A), multiple=4)
    common.check_test_size(args, 4)
    dataset = common.unpaired_dataset(args, train=False)
    for side, forward, backward, paths in (("A", G, F, dataset.paths_A), ("B", F, G, dataset.paths_B)):
        results = []
        for i in range(min(len(paths), args.num_test)):
            item = dataset[i]
            real = item[side][None].to(device)
            fake, rec = translate(forward, backward, real)
            path = item["path"] if side == "A" else item["path_B"]
            results.append({"A": item[side], "samples": [fake[0]], "extra": [("reconstruction", rec[0])],
                            "name": f"{side}_{Path(path).stem}"})
        # The toy metrics read outlines as inputs, so they only make sense for A -> B.
        common.write_test_results(out / "test" / ("AtoB" if side == "A" else "BtoA"), results, args,
                                  toy=None if side == "A" else False)


# ---------------------------------------------------------------------------------------------
# 7. Main: a plain loop over epochs and batches
# ---------------------------------------------------------------------------------------------
def main(args):
    device = common.setup_distributed(args.device)  # Multi-GPU: torchrun -> process group, GPU of this rank
    if args.test:
        return test(args, device) if common.is_main() else None  # Multi-GPU: rank 0 tests
    out = common.default_out(args, __file__)
    dataset = common.keep_in_memory(common.unpaired_dataset(args, train=True), device, args)  # decoded once
    common.check_trainable(dataset, args.batch_size)
    if args.lambda_idt > 0 and args.input_nc != args.output_nc:
        common.fail(f"the identity loss needs as many channels in A ({args.input_nc}) as in B "
                    f"({args.output_nc}); pass --lambda-idt 0")
    common.seed_everything(args.seed)
    nets = common.speed_up(build_networks(args, device), args)  # --channels-last, --compile
    # Multi-GPU: train_step gets the networks wrapped in DDP, which averages gradients over ranks
    # (world size 1: the same networks); checkpoints, previews and the test use the plain ones.
    train_nets = common.distribute(nets, device)
    G, F, D_A, D_B = nets
    # One optimizer for G and F, one for D_A and D_B (official code)
    optims = [common.adam([G, F], args.lr, (args.beta1, 0.999)), common.adam([D_A, D_B], args.lr, (args.beta1, 0.999))]
    schedulers = [common.linear_decay(opt, args.epochs, args.epochs_decay) for opt in optims]
    pools = [common.ImagePool(args.pool_size), common.ImagePool(args.pool_size)]
    names = ["G", "F", "D_A", "D_B", "opt_G", "opt_D", "sched_G", "sched_D", "pool_A", "pool_B"]
    parts = dict(zip(names, nets + optims + schedulers + pools))  # everything the checkpoint holds, by name
    epoch, skip, step = 0, 0, 0
    if args.resume:
        epoch, skip, step = common.resume(args.checkpoint or out / "latest.pt", device, args, parts)
    common.save_options(args, out)
    log = common.LossLog(out / "losses.csv", resume=args.resume)
    preview = [dataset[i] for i in range(min(4, len(dataset)))]

    def save(epoch, batch):
        state = common.training_state(parts, epoch=epoch, batch=batch, step=step, args=vars(args))
        common.save_checkpoint(out / "latest.pt", state)

    total_epochs = args.epochs + args.epochs_decay
    per_epoch = len(dataset) // (args.batch_size * common.world_size())  # Multi-GPU: --batch-size per rank
    total = min(args.max_iters or 10 ** 12, total_epochs * per_epoch)
    bar, speed = common.progress(total, step), common.Throughput(device)
    done = step >= total
    while not done and epoch < total_epochs:
        loader = common.epoch_loader(dataset, args.batch_size, epoch, args.seed, skip, args.num_workers)
        batch_index = skip - 1
        for batch_index, batch in enumerate(loader, start=skip):
            real_A = batch["A"].to(device, non_blocking=True)
            real_B = batch["B"].to(device, non_blocking=True)
            with common.mixed_precision(device, args.amp):  # --amp: bf16 autocast
                losses = train_step(train_nets, optims, pools, real_A, real_B, args)
            step += 1
            speed.step(args.batch_size * common.world_size())  # images of all ranks
            bar.update(1)
            if step % args.log_every == 0 or step == total:
                values = common.mean_over_ranks(losses)  # the only host sync of the loop (mean over ranks)
                bar.set_postfix(values | {"img/s": round(speed.rate(), 1)})
                log.write({"step": step, "epoch": epoch, "lr": optims[0].param_groups[0]["lr"]} | values)
            if step >= total:
                speed.stop()  # the timed window ends before the last checkpoint and preview
                done = True
                break
        skip = 0
        if done and batch_index + 1 < per_epoch:  # stopped inside an epoch
            save(epoch, batch_index + 1)
            break
        for scheduler in schedulers:
            scheduler.step()
        epoch += 1
        if common.is_main():  # Multi-GPU: rank 0 writes the preview
            sample_grid(G, F, preview, out / f"samples_epoch_{epoch:03d}.png", device)
        save(epoch, 0)
    bar.close()
    speed.report()
    print(f"checkpoint: {out / 'latest.pt'}; test with: python {Path(__file__).name} --test --out {out}")
    if common.is_main() and common.is_toy(args.dataset) and epoch == total_epochs:  # the toy demo tests itself
        args.test = True
        test(args, device)


if __name__ == "__main__":
    main(parse_args())
