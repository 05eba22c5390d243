"""Side by side: our MAE pretraining step against the official MAE code (facebookresearch/mae, efb2a80).

One pretraining step = forward with mask ratio 0.75, the loss (per-patch normalised pixels by
default, as the paper's released models and this project's default; ``--no-norm-pix-loss`` for
raw pixels), backward; fp32, no optimizer step (it would be the same ``torch.optim`` call on both
sides). For each model the official ``MaskedAutoencoderViT`` (``models_mae.mae_vit_*_dec512d8b``)
is built first and its state dict is copied into ours (the official names load as they are, as in
``tests/test_mae_official.py``); ours is built as ``mae-transfer pretrain`` builds it
(``create_mae(name, mask_ratio=..., norm_pix_loss=...)``). Both sides get the same images, and the
same masking noise: the official ``random_masking`` draws ``torch.rand(N, L)``, so the global
generator is seeded identically before each call of either side and ours is handed the
``torch.rand(N, L)`` drawn from that state (as our training loop hands it the batch's noise).
The check compares the masks, the losses and every gradient.

The official code is not a dependency: it is imported from ``--mae-src`` (a source tree of the
commit, see README.md). It was written for timm 0.3.2; two shims let it run with
today's timm and numpy, without changing what it computes:

* timm's ``Block`` no longer takes ``qk_scale`` (the official code passes ``qk_scale=None``, i.e.
  the default ``head_dim ** -0.5``): while ``models_mae`` is imported, ``Block`` is a subclass that
  drops a ``qk_scale`` of None (and refuses any other value);
* ``util/pos_embed.py`` uses ``np.float``, gone since numpy 1.24: it is set to ``float`` while the
  official model is built.

Today's timm ``Attention`` runs ``F.scaled_dot_product_attention`` (``timm.layers.use_fused_attn``),
where timm 0.3.2 multiplied and soft-maxed explicitly: the official side here is the official code
as it runs with a current timm.

    python benchmarks/side_by_side/mae.py [--ours-src ../before] [--pairs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from common import Result, alternate, print_ops, print_table, top_ops, use_source_tree, write_json

DEFAULT_MAE_SRC = os.environ.get("MAE_OFFICIAL_SRC", str(Path(__file__).resolve().parents[3] / "refs" / "mae"))
OFFICIAL = {"base": "mae_vit_base_patch16_dec512d8b", "large": "mae_vit_large_patch16_dec512d8b"}
OURS = {"base": "mae_vit_base_patch16", "large": "mae_vit_large_patch16"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mae-src", default=DEFAULT_MAE_SRC, help="official MAE source tree (env MAE_OFFICIAL_SRC)")
    p.add_argument("--ours-src", default=None, help="import mae_transfer from this checkout (before numbers)")
    p.add_argument("--pairs", type=int, default=3, help="alternating (reference, ours) pairs per workload")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--models", default="base:8,large:4", help="comma-separated size:batch, sizes base (ViT-B/16), large (ViT-L/16)"
    )
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--no-norm-pix-loss", action="store_true", help="raw pixel targets (official default)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler pass of our side")
    return p.parse_args(argv)


@contextlib.contextmanager
def numpy_float_alias():
    """``np.float`` (removed in numpy 1.24) as ``float`` inside the block, for ``util/pos_embed.py``."""
    import numpy as np

    had = "float" in np.__dict__
    if not had:
        np.float = float
    try:
        yield
    finally:
        if not had:
            del np.float


def import_official(src: str):
    """``models_mae`` of the official source tree, with ``qk_scale`` accepted by timm's ``Block``
    while it is imported (the attribute is restored afterwards: nothing else sees the shim)."""
    if not (Path(src) / "models_mae.py").is_file():
        sys.exit(f"official MAE source not found in --mae-src {src} (see README.md)")
    import timm.models.vision_transformer as tvt

    original = tvt.Block

    class Block(original):  # timm 0.3.2's signature: qk_scale=None meant head_dim ** -0.5, today's default
        def __init__(self, *args, qk_scale=None, **kwargs):
            if qk_scale is not None:
                raise ValueError("this shim only knows qk_scale=None")
            super().__init__(*args, **kwargs)

    tvt.Block = Block
    sys.path.insert(0, str(Path(src).resolve()))
    try:
        import models_mae
    finally:
        sys.path.pop(0)
        tvt.Block = original
    return models_mae


def main(argv=None) -> int:
    args = parse_args(argv)
    use_source_tree(args.ours_src)
    import timm
    import torch

    torch.set_num_threads(args.threads)
    import mae_transfer
    from mae_transfer.pretrain.model import create_mae

    models_mae = import_official(args.mae_src)
    norm_pix = not args.no_norm_pix_loss
    print(f"mae_transfer from {Path(mae_transfer.__file__).parent}")
    print(
        f"official models_mae from {Path(models_mae.__file__).parent}, "
        f"timm {timm.__version__}, torch {torch.__version__}"
    )
    print(f"{args.threads} thread(s), {args.img_size} px, mask ratio {args.mask_ratio}, norm_pix_loss {norm_pix}, fp32")

    results: list[Result] = []
    profiles: dict[str, list[dict]] = {}
    for spec in args.models.split(","):
        size, batch = spec.split(":")
        batch = int(batch)
        torch.manual_seed(0)
        with numpy_float_alias():
            official = models_mae.__dict__[OFFICIAL[size]](img_size=args.img_size, norm_pix_loss=norm_pix)
        ours = create_mae(OURS[size], img_size=args.img_size, mask_ratio=args.mask_ratio, norm_pix_loss=norm_pix)
        ours.load_state_dict(official.state_dict(), strict=True)
        official.train()
        ours.train()
        imgs = torch.randn(batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1))
        length = (args.img_size // 16) ** 2
        seed = 1234

        def official_step():
            official.zero_grad(set_to_none=True)
            torch.manual_seed(seed)  # random_masking's torch.rand(N, L)
            loss, pred, mask = official(imgs, mask_ratio=args.mask_ratio)
            loss.backward()
            return loss.item(), mask

        def our_step():
            ours.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            noise = torch.rand(batch, length)
            out = ours(imgs, mask_ratio=args.mask_ratio, noise=noise)
            out.loss.backward()
            return out.loss.item(), out.mask

        name = f"MAE step ViT-{size[0].upper()}/16, batch {batch}"
        print(f"\n{name}", flush=True)
        a, b = official_step(), our_step()
        params = dict(ours.named_parameters())
        grads = [
            (n, p.grad, params[n].grad)
            for n, p in official.named_parameters()
            if p.grad is not None or params[n].grad is not None
        ]
        missing = [n for n, g, h in grads if g is None or h is None]
        grad_diff = max(float((g - h).abs().max()) for n, g, h in grads if g is not None and h is not None)
        scale = max(float(g.abs().max()) for n, g, h in grads if g is not None)
        same_mask = torch.equal(a[1], b[1])
        loss_diff = abs(a[0] - b[0])
        text = (
            f"masks {'equal' if same_mask else 'DIFFER'}; loss official {a[0]:.6f}, ours {b[0]:.6f}, "
            f"diff {loss_diff:.1e}; "
            f"grads of {len(grads)} tensors max abs diff {grad_diff:.1e} (largest grad {scale:.1e})"
            + (f"; grad only on one side: {missing}" if missing else "")
        )
        print(f"  check: {text}")
        r = alternate(name, official_step, our_step, pairs=args.pairs, warmup=0)  # the check calls warmed up
        r.outputs_equal = same_mask and not missing and loss_diff <= 1e-5 and grad_diff <= 1e-4 * max(scale, 1.0)
        r.check = text
        results.append(r)
        if not args.no_profile:
            profiles[name] = top_ops(our_step)
            print_ops(name, profiles[name])
        official = ours = params = grads = None  # free this model before the next one

    print_table(
        results, f"MAE pretraining step: official MAE (reference) vs mae_transfer (ours), {args.threads} thread(s)"
    )
    write_json(
        results,
        args.json,
        {
            "mae_transfer": str(Path(mae_transfer.__file__).parent),
            "threads": args.threads,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "norm_pix_loss": norm_pix,
            "profiles": profiles,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
