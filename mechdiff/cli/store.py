"""``mechdiff store info`` and ``mechdiff store verify``: what a store holds, and whether it is intact."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from mechdiff.cli.common import EXPECTED, fail, man_help, opt_device, out

__all__ = ["store_app"]

store_app = typer.Typer(help="Inspect and check activation stores.", no_args_is_help=True)


@store_app.command("info")
def store_info_cmd(
    store: str = typer.Argument(..., help="Store root: a local path or an fsspec URL."),
) -> None:
    """Groups, arrays, shapes, dtypes, chunks, provenance and the fraction done of a store.

    EXAMPLE

      mechdiff store info acts.zarr
    """
    from mechdiff.engine.store import store_info

    try:
        infos = store_info(store)
    except EXPECTED as e:  # StoreIncompleteError included: a group whose creation was interrupted
        fail(e)
    if not infos:
        fail(f"{store} holds no activation group")
    for g in infos:
        damaged = f"; shards {g.damaged_shards} damaged (a chunk missing): re-run the extraction to rewrite them" if g.damaged_shards else ""
        t = Table(title=f"{g.group}  ({g.fraction_done:.0%} done{damaged})", title_justify="left")
        for c in ("array", "shape", "dtype", "chunks"):
            t.add_column(c)
        for a in g.arrays:
            t.add_row(a.name, str(tuple(a.shape)), str(a.dtype), str(tuple(a.chunks)))
        out.print(t)
        p = Table(show_header=False, box=None)
        for k, v in sorted(g.provenance.items()):
            p.add_row(f"  {k}", str(v))
        out.print(p)


def store_verify_cmd(
    store: str = typer.Argument(..., help="Store root: a local path or an fsspec URL."),
    group: Optional[str] = typer.Option(None, help="Group to check \\[default: the only group]."),
    sample: int = typer.Option(8, help="How many random finished examples to re-run (0: none, check the chunks only)."),
    repair: bool = typer.Option(False, help="Take down the done flags of damaged shards, so that the next extraction rewrites exactly those."),
    model: Optional[str] = typer.Option(None, help="Model to use instead of the one in the store's provenance."),
    device: str = opt_device(),
    seed: int = typer.Option(0, help="Seed for picking examples."),
) -> None:
    from mechdiff.engine.verify import verify_store

    if sample < 0:
        fail(f"--sample {sample}: give 0 or more examples to re-run (0 checks the stored chunks only)")
    try:
        rep = verify_store(store, group, sample=sample, model=model, device=device, seed=seed, repair=repair)
    except (*EXPECTED, KeyError) as e:
        fail(e)
    ig = rep.integrity
    if ig is not None:
        out.print(f"{rep.group}: {ig.summary()}", highlight=False)
        for p in ig.problems[:10]:
            out.print(f"  shard {p.shard if p.shard is not None else '-'}: {p.array} chunk {p.key} is {p.problem}", highlight=False)
        if len(ig.problems) > 10:
            out.print(f"  ... and {len(ig.problems) - 10} more", highlight=False)
        if rep.repaired:
            out.print(f"done flags taken down for shards {rep.repaired}: re-run the extraction to rewrite exactly those", highlight=False)
        elif ig.group_damaged:
            out.print("coords written at the group's creation are damaged: remove the group and extract it again", highlight=False)
        elif not ig.ok:
            out.print(f"run `mechdiff store verify {store} --group {rep.group or '/'} --repair`, then the extraction "
                      "again: it rewrites exactly the damaged shards", highlight=False, soft_wrap=True)
    if rep.sites:
        t = Table(title=f"{rep.group}: {len(rep.examples)} examples re-run", title_justify="left")
        for c in ("site", "max |diff|", "max |diff| / max |x|", "ok"):
            t.add_column(c)
        for s in rep.sites:
            t.add_row(s.site, f"{s.max_abs_diff:.3g}", f"{s.max_rel_diff:.3g}", "yes" if s.max_rel_diff <= rep.tolerance else "NO")
        out.print(t)
    elif ig is not None and ig.ok:
        out.print(f"{rep.group}: no examples re-run (--sample 0)", highlight=False)
    if not rep.ok:
        raise typer.Exit(1)


store_app.command("verify", help=man_help("""Check every chunk of every finished shard of STORE (present, and its
    crc32c matching its bytes), then re-run SAMPLE stored examples through the model and report the largest
    difference from what is stored.

    The model is not re-run on a damaged group; --repair takes down the done flags of the damaged shards, so
    that the next `mechdiff extract` rewrites exactly those.

    EXAMPLE

      mechdiff store verify acts.zarr --sample 8

    EXIT STATUS

    0 when every chunk is intact and every difference is within the stored dtype's rounding; 1 when a chunk
    is missing or corrupt or a difference exceeds it; 2 on bad input.
    """))(store_verify_cmd)
