"""``mechdiff zoo build`` and ``mechdiff zoo path``: the embedded model pair and its datasets."""

from __future__ import annotations

from pathlib import Path

import typer

from mechdiff.cli.common import EXPECTED, fail

__all__ = ["zoo_app"]

zoo_app = typer.Typer(help="The embedded default model pair and its datasets.", no_args_is_help=True)


@zoo_app.command("build")
def build(
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write base/, post/, data/ and manifest.json into."),
    steps: int | None = typer.Option(None, "--steps", help="Base-model step budget (default: the shipped recipe)."),
    seed: int | None = typer.Option(None, "--seed", help="World and training seed (default: the shipped pair's)."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Measure behaviour into the manifest."),
) -> None:
    """Rebuild the pair from its seed on CPU (about 15 minutes) into OUT, which must be new or empty.

    The pair is built in a hidden directory beside OUT and renamed to OUT when complete, so an
    interrupted build leaves no half-written OUT.

    EXAMPLE

      mechdiff zoo build --out pair/
    """
    from mechdiff.zoo.build import SEED, build_pair

    try:
        path = build_pair(out, steps=steps, seed=SEED if seed is None else seed, progress=True, evaluate=evaluate)
    except EXPECTED as e:
        fail(e)
    typer.echo(str(path))


@zoo_app.command("path")
def path(kind: str = typer.Argument(..., help="base, post or data")) -> None:
    """Print the directory of the shipped base model, post model or datasets.

    EXAMPLE

      mechdiff zoo path base
    """
    from mechdiff.zoo.paths import KINDS, zoo_path

    if kind not in KINDS:
        raise typer.BadParameter(f"expected one of {', '.join(KINDS)}", param_hint="KIND")
    try:
        typer.echo(str(zoo_path(kind)))  # type: ignore[arg-type]
    except EXPECTED as e:
        fail(e)
