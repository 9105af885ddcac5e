"""``cusa train``: train a student with CUSA soft labels read from the store."""

from __future__ import annotations

from typing import Annotated

import typer

from .exit_codes import friendly_errors


@friendly_errors
def train_cmd(
    config: Annotated[
        str, typer.Option("--config", "-c", help="Training config (.yaml, .json or .toml).")
    ],
    overrides: Annotated[
        list[str],
        typer.Option("--set", help="Override a key, e.g. --set optim.lr=3e-4 (repeatable)."),
    ] = [],  # noqa: B006 - typer hands the command a new list
    output_dir: Annotated[
        str | None, typer.Option("--output-dir", help="Same as --set run.output_dir=...")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Same as --set optim.max_steps=...")
    ] = None,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="Hide the progress bar.")
    ] = False,
    resume_anyway: Annotated[
        bool,
        typer.Option(
            "--resume-anyway",
            help="Resume a checkpoint made with a different config (the old config.json is kept beside it).",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Start again in an output dir that holds a run made with a different config (the old run is moved to previous-<time>/).",
        ),
    ] = False,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="Same as --set data.store=... (the feature store holding the teachers' features) [default: the config's, else $CUSA_HOME/store].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train a student with CUSA soft labels read from the feature store (DDP: run under torchrun)."""
    from cusa_train.config import TrainConfig
    from cusa_train.config.parsing import apply_overrides, load_mapping
    from cusa_train.trainer import train

    extra = list(overrides)
    if store is not None:
        extra.append(f"data.store={store}")
    if output_dir is not None:
        extra.append(f"run.output_dir={output_dir}")
    if max_steps is not None:
        extra.append(f"optim.max_steps={max_steps}")
    if no_progress:
        extra.append("run.progress=false")
    if resume_anyway and overwrite:
        raise typer.BadParameter("--resume-anyway and --overwrite exclude each other; pick one")
    if resume_anyway:
        extra.append("run.on_config_change=resume-anyway")
    if overwrite:
        extra.append("run.on_config_change=overwrite")
    cfg = TrainConfig.from_dict(apply_overrides(load_mapping(config), extra))
    result = train(cfg)
    final = {k: v for k, v in result.final.items() if not k.endswith("_s")}
    typer.echo(f"trained {result.steps} steps; checkpoint {result.checkpoint}")
    typer.echo(
        "final: "
        + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(final.items())
        )
    )
